"""RAM sections: batches of pages as runs, zero pages as flags only.

Payload: ``u32 nruns | u32 reserved | runs[nruns] | data``, each run ``u64 first_page |
u32 npages | u32 flags`` (flag 1: the pages are zero, no data follows). Data is the pages of
the non-zero runs, in run order. With compression the whole payload is one zstd frame.
Pages go out as memoryviews of guest memory (long runs) or as one gathered copy
(scattered pages), and come in with ``readinto`` straight into guest memory — never a
Python loop per page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from vmferry.errors import StreamError
from vmferry.memory.dirty import DirtyBitmap, expand_runs, page_runs
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.migration.channel import CHANNEL_BLOCK_SHIFT
from vmferry.migration.codec import (
    FLAG_LIVE,
    FLAG_ZSTD,
    RAM,
    RAM_HEAD,
    RUN_DTYPE,
    RUN_ZERO,
    SECTION_HEADER_SIZE,
)
from vmferry.migration.stream import SectionHeader, StreamReader, StreamWriter
from vmferry.migration.transport import Buffer

DEFAULT_BATCH_PAGES = 8192  # 32 MiB of data per section
MAX_BATCH_PAGES = (1 << 16) - 64  # the most a sender's batch_pages may be
# The most pages one RAM section may claim, zero runs included: a batch holds up to 63
# pages past batch_pages (it never splits a bitmap word). A section claiming more is
# corrupt, and is refused before anything is built per page.
MAX_SECTION_PAGES = MAX_BATCH_PAGES + 63
# A decompressed RAM payload is at most one batch; anything claiming more is corrupt.
MAX_DECOMPRESSED = RAM_HEAD.size + MAX_SECTION_PAGES * (RUN_DTYPE.itemsize + PAGE_SIZE)
# Runs shorter than this on average are gathered into one buffer instead of one iovec each.
GATHER_BELOW_RUN = 8
ZSTD_LEVEL = 1  # fastest standard level: migration is bandwidth-bound, not ratio-bound


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
    """Which of the (sorted) pages hold only zeros.

    Only a page whose first word is zero can be a zero page, and in a guest's data almost
    none is: reading one word per page (one cache line in 64) rules out most pages, and
    only the rest are read whole."""
    zero = np.zeros(pages.size, dtype=bool)
    if pages.size == 0:
        return zero
    allp = memory.pages()
    lo, hi = int(pages[0]), int(pages[-1]) + 1
    dense = hi - lo <= 2 * pages.size  # then a strided view, and a small gather from it
    first_words = allp[lo:hi, 0][pages - lo] if dense else allp[pages, 0]
    maybe = np.flatnonzero(first_words == 0)
    if maybe.size:
        zero[maybe] = ~np.any(allp[pages[maybe]], axis=1)
    return zero


@dataclass(frozen=True)
class Batch:
    """What one RAM section carries: the pages set in words [first_word, end_word) of a
    channel's dirty bitmap (the engine re-arms KVM's log for exactly these words)."""

    dirty: DirtyBitmap
    first_word: int
    end_word: int
    npages: int

    @property
    def first_page(self) -> int:
        return self.first_word * 64

    @property
    def page_span(self) -> int:
        return (self.end_word - self.first_word) * 64


def batch_runs(
    batch: Batch,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """A batch's pages (which the zero-page check reads) and their runs: (starts, lengths,
    pages). The sender needs the page numbers anyway, so they are read from the words once
    and the runs found from them."""
    pages = batch.dirty.pages(batch.first_word, batch.end_word)
    starts, lengths = page_runs(pages)
    return starts, lengths, pages


class RamSender:
    """Turns page lists into RAM sections on one stream (one per channel)."""

    def __init__(
        self,
        writer: StreamWriter,
        memory: GuestMemory,
        *,
        compress: bool = False,
        batch_pages: int = DEFAULT_BATCH_PAGES,
        sealed: bool = False,
    ) -> None:
        """``sealed``: never send live page data outside the checksum (a file): pages of
        a running guest are gathered into a private copy first, so the bytes hashed are
        the bytes written."""
        if not 1 <= batch_pages <= MAX_BATCH_PAGES:
            raise ValueError(f"batch_pages {batch_pages} is not 1..{MAX_BATCH_PAGES}")
        self.writer = writer
        self.memory = memory
        self.batch_pages = batch_pages
        self.sealed = sealed
        self._bounce = np.zeros(0, dtype=np.uint8)  # reused: a section is out when written
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if compress else None
        self.stats = RamStats()

    def send(
        self,
        pages: DirtyBitmap | npt.NDArray[np.int64],
        before_batch: Callable[[Batch], None] | None = None,
        *,
        live: bool = False,
        after_batch: Callable[[RamStats], None] | None = None,
    ) -> RamStats:
        """Send the pages set in ``pages`` (or these sorted page numbers) in batches of
        whole bitmap words; ``before_batch`` runs just before each is read (the engine
        re-arms the dirty log for exactly those words there), ``after_batch`` once it is
        out, with its counts. ``live``: the guest is running, so page data may change
        while it is sent (see FLAG_LIVE)."""
        dirty = (
            pages
            if isinstance(pages, DirtyBitmap)
            else DirtyBitmap.from_pages(self.memory.npages, pages)
        )
        stats = RamStats()
        for first, end in dirty.batches(self.batch_pages):
            todo = Batch(dirty, first, end, dirty.count(first, end))
            if before_batch is not None:
                before_batch(todo)
            batch = self._send_batch(todo, live)
            stats.add(batch)
            if after_batch is not None:
                after_batch(batch)
        self.stats.add(stats)
        return stats

    def _send_batch(self, todo: Batch, live: bool) -> RamStats:
        allp = self.memory.pages()
        starts, lengths, chunk = batch_runs(todo)
        zero = zero_pages(self.memory, chunk)
        if zero.any():  # rare in a guest's data: only then are runs cut at zero pages
            starts, lengths, is_zero = split_runs(chunk, zero)
        else:
            is_zero = np.zeros(starts.size, dtype=bool)
        runs = np.zeros(starts.size, dtype=RUN_DTYPE)
        runs["first"], runs["npages"], runs["flags"] = starts, lengths, is_zero * RUN_ZERO
        d_starts, d_lengths = starts[~is_zero], lengths[~is_zero]
        head: list[Buffer] = [RAM_HEAD.pack(runs.size, 0), runs.tobytes()]
        data: list[Buffer]
        if self._zstd is not None or (d_starts.size and d_lengths.mean() < GATHER_BELOW_RUN):
            # A private copy: consistent with its checksum even while the guest runs.
            data = [allp[expand_runs(d_starts, d_lengths)].data.cast("B")] if d_starts.size else []
        elif live and self.sealed:
            data = [self._snapshot(d_starts, d_lengths)] if d_starts.size else []
        else:
            b = self.memory.bytes
            data = [
                b[s * PAGE_SIZE : (s + n) * PAGE_SIZE].data
                for s, n in zip(d_starts.tolist(), d_lengths.tolist(), strict=True)
            ]
        before = self.writer.bytes_written
        if self._zstd is not None:
            frame = self._zstd.compress(b"".join(bytes(x) for x in (*head, *data)))
            self.writer.section(RAM, [frame], flags=FLAG_ZSTD)
        elif live and not self.sealed:
            self.writer.section(RAM, [*head, *data], flags=FLAG_LIVE, hashed=len(head))
        else:
            self.writer.section(RAM, [*head, *data])
        nz = int(d_lengths.sum())
        return RamStats(normal=nz, zero=chunk.size - nz, bytes=self.writer.bytes_written - before)

    def _snapshot(
        self, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
    ) -> memoryview:
        """Long runs copied into one reused buffer, a memcpy per run (about twice as fast
        as a fancy-index gather, which also allocates)."""
        size = int(lengths.sum()) * PAGE_SIZE
        if self._bounce.size < size:
            self._bounce = np.empty(size, dtype=np.uint8)
        b, off = self.memory.bytes, 0
        for s, n in zip((starts * PAGE_SIZE).tolist(), (lengths * PAGE_SIZE).tolist(), strict=True):
            self._bounce[off : off + n] = b[s : s + n]
            off += n
        return self._bounce[:size].data


def send_pages(
    writer: StreamWriter,
    memory: GuestMemory,
    pages: DirtyBitmap | npt.NDArray[np.int64],
    batch_pages: int = DEFAULT_BATCH_PAGES,
) -> RamStats:
    return RamSender(writer, memory, batch_pages=batch_pages).send(pages)


class _StreamPayload:
    """Reads a section payload from the stream, feeding the section checksum."""

    def __init__(self, reader: StreamReader, hdr: SectionHeader, h: xxhash.xxh3_64) -> None:
        self.reader, self.hdr, self.h = reader, hdr, h

        self.hashing = True

    @property
    def stop_hashing_after_table(self) -> bool:
        return bool(self.hdr.flags & FLAG_LIVE)

    def read(self, view: memoryview) -> None:
        self.reader.read(self.hdr, view)
        if self.hashing:
            self.h.update(view)


class _BufferPayload:
    """Reads a decompressed payload from memory."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def read(self, view: memoryview) -> None:
        n = view.nbytes
        view.cast("B")[:] = self.data[self.pos : self.pos + n]
        self.pos += n


class RamReceiver:
    """Loads RAM sections into guest memory, checking every address against RAM's size.

    Thread-safe across channels: each page travels on one channel, that of its 512-page
    block (channel.split_by_channel), and with ``channels`` > 1 this receiver (channel
    ``channel``) refuses a run of another channel's block or crossing a block, so no two
    threads write one page, nor one word of the shared ``written`` bitmap.
    """

    def __init__(
        self,
        memory: GuestMemory,
        written: DirtyBitmap | None = None,
        channel: int = 0,
        channels: int = 1,
    ) -> None:
        if not 0 <= channel < channels:
            raise ValueError(f"channel {channel} of {channels}")
        self.memory = memory
        self.channel, self.channels = channel, channels
        # Pages the stream has written: a zero page never written is zero already. Channels
        # share one bitmap; a block is whole words, so their updates never share a word.
        self.written = written if written is not None else DirtyBitmap(memory.npages)
        self.stats = RamStats()
        self._zstd = zstandard.ZstdDecompressor()
        # Told of every section's runs once its pages are in memory: (first, npages,
        # is_zero) arrays (x-verify on digests pages as they land: landing.py).
        self.on_landed: (
            Callable[[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]], None]
            | None
        ) = None

    def load(self, reader: StreamReader, hdr: SectionHeader, h: xxhash.xxh3_64) -> None:
        if hdr.flags & FLAG_ZSTD:
            frame = bytearray(hdr.length)
            reader.read(hdr, memoryview(frame))
            h.update(frame)
            reader.check(hdr, h)  # the frame is checked before it is decompressed
            try:
                size = zstandard.frame_content_size(bytes(frame[:18]))
            except zstandard.ZstdError as e:
                raise StreamError(f"{hdr.describe()}: compressed RAM is not a zstd frame") from e
            if not 0 <= size <= MAX_DECOMPRESSED:
                raise StreamError(f"{hdr.describe()}: compressed RAM claims {size} bytes")
            try:
                raw = self._zstd.decompress(bytes(frame), max_output_size=MAX_DECOMPRESSED)
            except zstandard.ZstdError as e:
                raise StreamError(f"{hdr.describe()}: cannot decompress RAM: {e}") from e
            self._load_payload(_BufferPayload(raw), len(raw), hdr)
        else:
            src = _StreamPayload(reader, hdr, h)
            self._load_payload(src, hdr.length, hdr, src.stop_hashing_after_table)
            reader.check(hdr, h)

    def _load_payload(
        self,
        src: _StreamPayload | _BufferPayload,
        length: int,
        hdr: SectionHeader,
        table_only: bool = False,
    ) -> None:
        head = bytearray(RAM_HEAD.size)
        if length < RAM_HEAD.size:
            raise StreamError(f"{hdr.describe()}: {length} bytes is too short for RAM")
        src.read(memoryview(head))
        nruns, _ = RAM_HEAD.unpack(head)
        if nruns > MAX_SECTION_PAGES:  # a run is a page at least
            raise StreamError(f"{hdr.describe()}: {nruns} runs is more than a section holds")
        table_len = nruns * RUN_DTYPE.itemsize
        if RAM_HEAD.size + table_len > length:
            raise StreamError(f"{hdr.describe()}: {nruns} runs do not fit in {length} bytes")
        table = bytearray(table_len)
        src.read(memoryview(table))
        runs = np.frombuffer(table, dtype=RUN_DTYPE)
        first = runs["first"].astype(np.int64)
        npages = runs["npages"].astype(np.int64)
        flags = runs["flags"]
        npg = self.memory.npages
        bad_mask = (runs["first"] >= npg) | (npages <= 0) | (first + npages > npg)
        bad_mask |= (flags & ~np.uint32(RUN_ZERO)) != 0
        if bad_mask.any():
            bad = int(np.flatnonzero(bad_mask)[0])
            raise StreamError(
                f"{hdr.describe()}: run {bad} (page {int(runs['first'][bad])} + "
                f"{int(runs['npages'][bad])}, flags {int(flags[bad])}) is outside guest RAM "
                f"of {npg} pages or malformed"
            )
        self._check_claims(first, npages, hdr)
        is_zero = (flags & RUN_ZERO) != 0
        data_len = int(npages[~is_zero].sum()) * PAGE_SIZE
        if RAM_HEAD.size + table_len + data_len != length:
            raise StreamError(
                f"{hdr.describe()}: runs carry {data_len} bytes of pages but the section "
                f"has {length - RAM_HEAD.size - table_len}"
            )
        d_first, d_n = first[~is_zero], npages[~is_zero]
        self.memory.ensure_populated(d_first, d_n)  # allocated ahead, not in the socket read
        allp = self.memory.pages()
        if table_only and isinstance(src, _StreamPayload):
            src.hashing = False
        if d_first.size and (isinstance(src, _BufferPayload) or d_n.mean() < GATHER_BELOW_RUN):
            bounce = np.empty((int(d_n.sum()), PAGE_SIZE // 8), dtype=np.uint64)
            src.read(bounce.data.cast("B"))
            allp[expand_runs(d_first, d_n)] = bounce
        else:
            for s, n in zip(d_first.tolist(), d_n.tolist(), strict=True):
                src.read(self.memory.view(s * PAGE_SIZE, n * PAGE_SIZE))
        z = expand_runs(first[is_zero], npages[is_zero])
        if z.size:
            allp[z[self.written.test(z)]] = 0
        self.written.set_runs(d_first, d_n)
        if self.on_landed is not None:
            self.on_landed(first, npages, is_zero)
        self.stats.add(
            RamStats(normal=int(d_n.sum()), zero=z.size, bytes=hdr.length + SECTION_HEADER_SIZE)
        )

    def _check_claims(
        self, first: npt.NDArray[np.int64], npages: npt.NDArray[np.int64], hdr: SectionHeader
    ) -> None:
        """Refuse a section claiming more pages than a batch holds (zero runs cost nothing
        on the wire, so only this bounds the work and memory a zero run makes), and with
        several channels, a run not wholly in one of this channel's blocks."""
        total = int(npages.sum())
        if total > MAX_SECTION_PAGES:
            raise StreamError(
                f"{hdr.describe()}: its {npages.size} runs claim {total} pages, more than "
                f"a section holds ({MAX_SECTION_PAGES})"
            )
        if self.channels == 1:
            return
        block = first >> CHANNEL_BLOCK_SHIFT
        wrong = (block % self.channels != self.channel) | (
            (first + npages - 1) >> CHANNEL_BLOCK_SHIFT != block
        )
        if wrong.any():
            bad = int(np.flatnonzero(wrong)[0])
            raise StreamError(
                f"{hdr.describe()}: run {bad} (page {int(first[bad])} + {int(npages[bad])}) "
                f"is not within a block of channel {self.channel} of {self.channels}"
            )
