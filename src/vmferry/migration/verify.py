"""Self-verification: digests of every page and of the CPU state, taken at switchover.

A page digest is a keyed linear hash: the page's 512 64-bit words dotted with 512 random
odd keys, modulo 2**64. One differing word always changes it (an odd key is invertible
mod 2**64); several differing words collide with probability about 2**-64 for keys the
source draws fresh for every migration. It is one integer matrix-vector product over RAM,
so it runs at memory speed and splits across threads (numpy releases the GIL).
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.errors import StreamError
from vmferry.machine.state import MachineState
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory

WORDS_PER_PAGE = PAGE_SIZE // 8
CHUNK_PAGES = 16384  # 64 MiB per task
VRFY_HEAD = struct.Struct("<QQQ")  # key seed, page count, cpu digest
MAX_MISMATCHES_REPORTED = 16
# MSRs that move on their own while a VM is paused (the TSC counts host time).
VOLATILE_MSRS = frozenset({0x10})


def page_keys(seed: int) -> npt.NDArray[np.uint64]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64 - 1, size=WORDS_PER_PAGE, dtype=np.uint64, endpoint=True)
    return keys | np.uint64(1)


def page_digests(
    memory: GuestMemory, pages: npt.NDArray[np.int64], seed: int, threads: int = 2
) -> npt.NDArray[np.uint64]:
    """Digest of each listed page, in order; dense runs are hashed without copying."""
    keys = page_keys(seed)
    allp = memory.pages()
    out = np.empty(pages.size, dtype=np.uint64)

    def work(i: int) -> None:
        chunk = pages[i : i + CHUNK_PAGES]
        lo, hi = int(chunk[0]), int(chunk[-1]) + 1
        if hi - lo == chunk.size:  # contiguous: a view
            out[i : i + chunk.size] = allp[lo:hi] @ keys
        else:
            out[i : i + chunk.size] = allp[chunk] @ keys

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(work, range(0, pages.size, CHUNK_PAGES)))
    return out


def cpu_digest(state: MachineState) -> int:
    """Digest of everything a vCPU resumes from (the clock and TSC move while paused)."""
    parts = []
    for v in state.vcpus:
        d = v.to_dict()
        d["msrs"] = {k: val for k, val in d["msrs"].items() if int(k, 16) not in VOLATILE_MSRS}
        parts.append(d)
    return xxhash.xxh3_64_intdigest(json.dumps(parts, sort_keys=True).encode())


@dataclass
class VerifyRecord:
    """What the source sends: the key seed, the pages it digested, their digests."""

    seed: int
    pages: npt.NDArray[np.int64]
    digests: npt.NDArray[np.uint64]
    cpu: int

    def encode(self) -> list[bytes]:
        return [
            VRFY_HEAD.pack(self.seed, self.pages.size, self.cpu),
            self.pages.astype("<i8").tobytes(),
            self.digests.astype("<u8").tobytes(),
        ]

    @classmethod
    def decode(cls, payload: bytes, npages_ram: int) -> VerifyRecord:
        if len(payload) < VRFY_HEAD.size:
            raise StreamError("VRFY section is too short")
        seed, count, cpu = VRFY_HEAD.unpack_from(payload)
        if len(payload) != VRFY_HEAD.size + 16 * count:
            raise StreamError(f"VRFY section has {len(payload)} bytes for {count} pages")
        pages = np.frombuffer(payload, dtype="<i8", count=count, offset=VRFY_HEAD.size)
        digests = np.frombuffer(
            payload, dtype="<u8", count=count, offset=VRFY_HEAD.size + 8 * count
        )
        if count and (pages.min() < 0 or pages.max() >= npages_ram or (np.diff(pages) <= 0).any()):
            raise StreamError("VRFY section lists pages outside guest RAM or out of order")
        return cls(seed, pages.astype(np.int64), digests.astype(np.uint64), cpu)


def mismatched_pages(
    memory: GuestMemory,
    record: VerifyRecord,
    written_elsewhere: npt.NDArray[np.int64],
) -> list[int]:
    """Pages whose content differs from the source's: digests that differ, and pages the
    destination holds data for that the source had as holes (those must read zero)."""
    mine = page_digests(memory, record.pages, record.seed)
    bad = record.pages[mine != record.digests]
    extra = np.setdiff1d(written_elsewhere, record.pages, assume_unique=True)
    if extra.size:
        nonzero = extra[np.any(memory.pages()[extra], axis=1)]
        bad = np.union1d(bad, nonzero)
    return [int(p) for p in bad[:MAX_MISMATCHES_REPORTED]]
