"""Self-verification: digests of every page and of the CPU state, taken at switchover.

A page digest is a keyed linear hash: the page's 512 64-bit words dotted with 512 random
odd keys, modulo 2**64. One differing word always changes it (an odd key is invertible
mod 2**64); several differing words collide with probability about 2**-64 for keys the
source draws fresh for every migration. It is one integer matrix-vector product over RAM,
so it runs at memory speed and splits across threads (numpy releases the GIL).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.machine.state import MachineState
from vmferry.memory.dirty import DirtyBitmap, page_runs
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.migration.codec import VerifyRecord

WORDS_PER_PAGE = PAGE_SIZE // 8
CHUNK_PAGES = 16384  # 64 MiB per task
MAX_MISMATCHES_REPORTED = 16
# MSRs that move on their own while a VM is paused (the TSC counts host time).
VOLATILE_MSRS = frozenset({0x10})


def page_keys(seed: int) -> npt.NDArray[np.uint64]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64 - 1, size=WORDS_PER_PAGE, dtype=np.uint64, endpoint=True)
    return keys | np.uint64(1)


def digest_rows(
    rows: npt.NDArray[np.uint64], keys: npt.NDArray[np.uint64]
) -> npt.NDArray[np.uint64]:
    """Each row's (page's) digest. einsum's integer dot runs about twice as fast as
    matmul's here, with the same wrap-around mod 2**64."""
    out: npt.NDArray[np.uint64] = np.einsum("ij,j->i", rows, keys)
    return out


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
            out[i : i + chunk.size] = digest_rows(allp[lo:hi], keys)
        else:
            out[i : i + chunk.size] = digest_rows(allp[chunk], keys)

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


def written_outside(written: DirtyBitmap, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Pages written that are not among ``pages`` (sorted): the record's pages cleared
    from a copy of the bitmap run by run."""
    outside = written.copy()
    outside.clear_runs(*page_runs(pages))
    return outside.pages()


def mismatched_pages(
    memory: GuestMemory,
    record: VerifyRecord,
    written_elsewhere: DirtyBitmap,
) -> list[int]:
    """Pages whose content differs from the source's: digests that differ, and pages the
    destination holds data for (its bitmap) that the source had as holes
    (those must read zero)."""
    mine = page_digests(memory, record.pages, record.seed)
    bad = record.pages[mine != record.digests]
    extra = written_outside(written_elsewhere, record.pages)
    if extra.size:
        nonzero = extra[np.any(memory.pages()[extra], axis=1)]
        bad = np.union1d(bad, nonzero)
    return [int(p) for p in bad[:MAX_MISMATCHES_REPORTED]]


def pre_resume_pages(final_pages: int, reachable_pages: int) -> int:
    """How many pages x-verify on digests inside the downtime (at most): the final
    round's and every page a device can reach (the policy's downtime estimate counts it).
    With a DMA device whose IOMMU maps all RAM that is all resident RAM."""
    return final_pages + reachable_pages


def pre_resume_set(
    final: npt.NDArray[np.int64],
    reachable: npt.NDArray[np.int64],
    resident: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """What the CPU's dirty log cannot vouch for, checked before resume: the final
    round's pages, and the resident pages a device can reach (DMA bypasses the log; a
    hole is zero on both sides, and the audit checks it)."""
    return np.union1d(final, np.intersect1d(reachable, resident, assume_unique=True))
