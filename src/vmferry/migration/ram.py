"""RAM sections: batches of pages as runs, zero pages as flags only.

Payload: ``u32 nruns | u32 reserved | runs[nruns] | data``, each run ``u64 first_page |
u32 npages | u32 flags`` (flag 1: the pages are zero, no data follows). Data is the pages of
the non-zero runs, in run order. Pages go out as memoryviews of guest memory (long runs)
or as one gathered copy (scattered pages), and come in with ``readinto`` straight into
guest memory — never a Python loop per page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.errors import StreamError
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.migration.stream import (
    RAM,
    SECTION_HEADER_SIZE,
    SectionHeader,
    StreamReader,
    StreamWriter,
)
from vmferry.migration.transport import Buffer

RUN_DTYPE = np.dtype([("first", "<u8"), ("npages", "<u4"), ("flags", "<u4")])
RUN_ZERO = 1
RAM_HEAD = struct.Struct("<II")
DEFAULT_BATCH_PAGES = 8192  # 32 MiB of data per section
# Runs shorter than this on average are gathered into one buffer instead of one iovec each.
GATHER_BELOW_RUN = 8


@dataclass
class RamStats:
    normal: int = 0  # pages sent with data
    zero: int = 0  # pages sent as a flag
    bytes: int = 0  # bytes on the wire, headers included

    def add(self, other: RamStats) -> None:
        self.normal += other.normal
        self.zero += other.zero
        self.bytes += other.bytes


def split_runs(
    pages: npt.NDArray[np.int64], zero: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Runs of consecutive pages with the same zero flag: (starts, lengths, is_zero)."""
    if pages.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0, dtype=bool)
    brk = np.flatnonzero((np.diff(pages) != 1) | (zero[1:] != zero[:-1])) + 1
    starts_idx = np.concatenate(([0], brk))
    lengths = np.diff(np.concatenate((starts_idx, [pages.size])))
    return pages[starts_idx], lengths, zero[starts_idx]


def zero_pages(memory: GuestMemory, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which of the (sorted) pages hold only zeros; a view over dense spans, a gather else."""
    if pages.size == 0:
        return np.zeros(0, dtype=bool)
    allp = memory.pages()
    lo, hi = int(pages[0]), int(pages[-1]) + 1
    if hi - lo <= 2 * pages.size:
        nz: npt.NDArray[np.bool_] = np.any(allp[lo:hi], axis=1)  # a view: no copy
        return ~nz[pages - lo]
    gathered: npt.NDArray[np.bool_] = np.any(allp[pages], axis=1)
    return ~gathered


def expand_runs(
    first: npt.NDArray[np.int64], npages: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """[first_i, first_i + npages_i) for every run, concatenated, vectorised."""
    total = int(npages.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(npages) - npages, npages)
    return np.repeat(first, npages) + (np.arange(total, dtype=np.int64) - offsets)


def send_pages(
    writer: StreamWriter,
    memory: GuestMemory,
    pages: npt.NDArray[np.int64],
    batch_pages: int = DEFAULT_BATCH_PAGES,
) -> RamStats:
    """Send the given sorted pages as RAM sections of at most ``batch_pages`` pages each."""
    stats = RamStats()
    allp = memory.pages()
    for i in range(0, pages.size, batch_pages):
        chunk = pages[i : i + batch_pages]
        zero = zero_pages(memory, chunk)
        starts, lengths, is_zero = split_runs(chunk, zero)
        runs = np.zeros(starts.size, dtype=RUN_DTYPE)
        runs["first"], runs["npages"], runs["flags"] = starts, lengths, is_zero * RUN_ZERO
        data_starts, data_lengths = starts[~is_zero], lengths[~is_zero]
        bufs: list[Buffer] = [RAM_HEAD.pack(runs.size, 0), runs.tobytes()]
        if data_starts.size and data_lengths.mean() < GATHER_BELOW_RUN:
            bufs.append(allp[expand_runs(data_starts, data_lengths)].data.cast("B"))
        else:
            b = memory.bytes
            bufs.extend(
                memoryview(b[s * PAGE_SIZE : (s + n) * PAGE_SIZE])  # type: ignore[arg-type]
                for s, n in zip(data_starts.tolist(), data_lengths.tolist(), strict=True)
            )
        before = writer.bytes_written
        writer.section(RAM, bufs)
        nz = int(data_lengths.sum())
        stats.add(RamStats(normal=nz, zero=chunk.size - nz, bytes=writer.bytes_written - before))
    return stats


class RamReceiver:
    """Loads RAM sections into guest memory, checking every address against RAM's size."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        # Pages the stream has written: a zero page never written is zero already.
        self.written = DirtyBitmap(memory.npages)
        self.stats = RamStats()

    def load(self, reader: StreamReader, hdr: SectionHeader, h: xxhash.xxh3_64) -> None:
        head = bytearray(RAM_HEAD.size)
        if hdr.length < RAM_HEAD.size:
            raise StreamError(f"{hdr.describe()}: {hdr.length} bytes is too short for RAM")
        reader.read(hdr, memoryview(head))
        h.update(head)
        nruns, _ = RAM_HEAD.unpack(head)
        table_len = nruns * RUN_DTYPE.itemsize
        if RAM_HEAD.size + table_len > hdr.length:
            raise StreamError(f"{hdr.describe()}: {nruns} runs do not fit in {hdr.length} bytes")
        table = bytearray(table_len)
        reader.read(hdr, memoryview(table))
        h.update(table)
        runs = np.frombuffer(table, dtype=RUN_DTYPE)
        first = runs["first"].astype(np.int64)
        npages = runs["npages"].astype(np.int64)
        flags = runs["flags"]
        if runs.size and (
            (runs["first"] >= self.memory.npages).any()
            or (npages <= 0).any()
            or (first + npages > self.memory.npages).any()
            or (flags & ~np.uint32(RUN_ZERO)).any()
        ):
            bad = int(
                np.flatnonzero(
                    (runs["first"] >= self.memory.npages)
                    | (npages <= 0)
                    | (first + npages > self.memory.npages)
                    | (flags & ~np.uint32(RUN_ZERO) != 0)
                )[0]
            )
            raise StreamError(
                f"{hdr.describe()}: run {bad} (page {int(runs['first'][bad])} + "
                f"{int(runs['npages'][bad])}, flags {int(flags[bad])}) is outside guest RAM "
                f"of {self.memory.npages} pages or malformed"
            )
        is_zero = (flags & RUN_ZERO) != 0
        data_len = int(npages[~is_zero].sum()) * PAGE_SIZE
        if RAM_HEAD.size + table_len + data_len != hdr.length:
            raise StreamError(
                f"{hdr.describe()}: runs carry {data_len} bytes of pages but the section "
                f"has {hdr.length - RAM_HEAD.size - table_len}"
            )
        d_first, d_n = first[~is_zero], npages[~is_zero]
        allp = self.memory.pages()
        if d_first.size and d_n.mean() < GATHER_BELOW_RUN:
            bounce = np.empty((int(d_n.sum()), PAGE_SIZE // 8), dtype=np.uint64)
            reader.read(hdr, bounce.data.cast("B"))
            h.update(bounce.data)
            allp[expand_runs(d_first, d_n)] = bounce
        else:
            for s, n in zip(d_first.tolist(), d_n.tolist(), strict=True):
                view = self.memory.view(s * PAGE_SIZE, n * PAGE_SIZE)
                reader.read(hdr, view)
                h.update(view)
        z = expand_runs(first[is_zero], npages[is_zero])
        if z.size:
            mask = (
                (self.written.words[z >> 6] >> (z & 63).astype(np.uint64)) & np.uint64(1)
            ).astype(bool)
            allp[z[mask]] = 0
        reader.check(hdr, h)
        self.written.set_pages(expand_runs(d_first, d_n))
        self.stats.add(
            RamStats(normal=int(d_n.sum()), zero=z.size, bytes=hdr.length + SECTION_HEADER_SIZE)
        )
