"""The destination's digests of pages as they land (x-verify on).

Each RAM section's pages are digested (verify.py's keyed linear digest, the source's
keys: the seed comes in the CONF) right after they were written into guest memory, one
uint64 per page of RAM; a zero page's digest is 0, as is a page never written (it is
zero). So the checks compare the source's digests with what arrived, without reading
RAM again: before resume the pages the dirty log cannot vouch for, after resume (the
guest has changed its RAM by then) all of them.

The receivers only queue each section's runs; one worker thread digests them, beside the
receiving (numpy's product releases the GIL), so the landing costs the receive path
nothing but a queue put. A page written again while its older landing is digested gets a
torn digest first and the right one next: its new landing is queued after the write, and
the queue is worked in order. ``drain`` waits for the queue before anything compares;
``close`` stops the worker before the memory may go (the section loop does one or the
other whenever it ends). Channels update disjoint pages, so one array serves them all.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np
import numpy.typing as npt

from vmferry.memory.dirty import expand_runs
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.verify import digest_rows, page_keys

log = logging.getLogger(__name__)
Runs = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]
GATHER_BELOW_RUN = 8  # shorter runs on average: one gather for the section, not a view each


class LandingDigests:
    """One digest per page of ``memory``, kept as the stream writes it."""

    def __init__(self, memory: GuestMemory, seed: int) -> None:
        self.memory = memory
        self.keys = page_keys(seed)
        self.digests = np.zeros(memory.npages, dtype=np.uint64)
        self._queue: queue.Queue[Runs | None] = queue.Queue()
        self._closed = False
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="landing-digests", daemon=True)
        self._worker.start()

    def landed(
        self,
        first: npt.NDArray[np.int64],
        npages: npt.NDArray[np.int64],
        is_zero: npt.NDArray[np.bool_],
    ) -> None:
        """A section's runs are in memory: queued for the worker (copies: the receiver's
        arrays may be views of a buffer it reuses)."""
        if not self._closed:
            self._queue.put((first.copy(), npages.copy(), is_zero.copy()))

    def drain(self) -> None:
        """Every landing queued so far is digested (before a comparison)."""
        self._queue.join()
        if self._error is not None:
            raise RuntimeError(f"digesting landed pages failed: {self._error!r}")

    def close(self) -> None:
        """Stop the worker (what is queued is dropped): the memory may go after this."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if not self._closed:
                    self.digest(*item)
            except BaseException as e:  # reported by drain, on the loop's thread
                log.error("digesting landed pages failed: %r", e)
                self._error = e
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def digest(
        self,
        first: npt.NDArray[np.int64],
        npages: npt.NDArray[np.int64],
        is_zero: npt.NDArray[np.bool_],
    ) -> None:
        """Digest a section's data runs as they are in memory now; zero its zero runs."""
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
