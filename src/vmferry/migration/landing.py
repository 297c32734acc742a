"""The destination's digests of pages as they land (x-verify on).

Each RAM section's pages are digested (verify.py's keyed linear digest, the source's
keys: the seed comes in the CONF) right after they were written into guest memory, one
uint64 per page of RAM; a zero page's digest is 0, as is a page never written (it is
zero). So the checks compare the source's digests with what arrived, without reading
RAM again: before resume the pages the dirty log cannot vouch for, after resume (the
guest has changed its RAM by then) all of them.

Channels update disjoint pages (a 512-page block is one channel's), so one array serves
them all; numpy's product releases the GIL.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmferry.memory.dirty import expand_runs
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.verify import digest_rows, page_keys

GATHER_BELOW_RUN = 8  # shorter runs on average: one gather for the section, not a view each


class LandingDigests:
    """One digest per page of ``memory``, kept as the stream writes it."""

    def __init__(self, memory: GuestMemory, seed: int) -> None:
        self.memory = memory
        self.keys = page_keys(seed)
        self.digests = np.zeros(memory.npages, dtype=np.uint64)

    def landed(
        self,
        first: npt.NDArray[np.int64],
        npages: npt.NDArray[np.int64],
        is_zero: npt.NDArray[np.bool_],
    ) -> None:
        """A section's runs are in memory: digest the data runs, zero the zero runs."""
        allp, keys, out = self.memory.pages(), self.keys, self.digests
        d_first, d_n = first[~is_zero], npages[~is_zero]
        if d_first.size and d_n.mean() < GATHER_BELOW_RUN:
            idx = expand_runs(d_first, d_n)
            out[idx] = digest_rows(allp[idx], keys)
        else:
            for s, n in zip(d_first.tolist(), d_n.tolist(), strict=True):
                out[s : s + n] = digest_rows(allp[s : s + n], keys)
        z = expand_runs(first[is_zero], npages[is_zero])
        if z.size:
            out[z] = 0

    def differing(
        self, pages: npt.NDArray[np.int64], digests: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.int64]:
        """Of ``pages``, those whose landed digest is not the source's."""
        bad: npt.NDArray[np.int64] = pages[self.digests[pages] != digests]
        return bad

    def differing_range(self, first: int, digests: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Pages of [first, first + len(digests)) whose landed digest is not the source's."""
        here = self.digests[first : first + digests.size]
        return np.flatnonzero(here != digests).astype(np.int64) + first


__all__ = ["LandingDigests"]
