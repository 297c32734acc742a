"""The destination's digests of pages as they land (x-verify on).

Each RAM section's pages are digested (verify.py's keyed linear digest, the source's
keys: the seed comes in the CONF) right after they were written into guest memory, one
uint64 per page of RAM; a zero page's digest is 0, as is a page never written (it is
zero). So the checks compare the source's digests with what arrived, without reading RAM
again: before resume the pages the dirty log cannot vouch for, after resume (the guest
has changed its RAM by then) all of them.

The receivers only queue each section's runs; one worker thread digests them, beside the
receiving (numpy's product releases the GIL), so the landing costs the receive path
nothing but a queue put while the worker keeps up. It may fall behind by at most
MAX_BACKLOG_PAGES data pages: past that a receiver waits for it (``landed`` blocks), so
what is left to digest after the stream's END — drained inside the downtime, and counted
in the pre-resume check's time — stays bounded whatever the RAM. A page written again
while its older landing is digested gets a torn digest first and the right one next: its
new landing is queued after the write, and the queue is worked in order. ``drain`` waits
for the queue before anything compares; ``close`` stops the worker before the memory may
go (the section loop does one or the other whenever it ends). Channels update disjoint
pages, so one array serves them all.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import numpy.typing as npt

from vmferry.errors import MigrationError
from vmferry.memory.dirty import expand_runs
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.verify import WORDS_PER_PAGE, digest_rows, page_keys

log = logging.getLogger(__name__)
Runs = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]
GATHER_BELOW_RUN = 8  # shorter runs on average: one gather for the section, not a view each
# Data pages queued but not yet digested, at most (128 MiB of RAM: ~25 ms of digesting at
# ~5 GB/s): what the drain after END may cost the downtime.
MAX_BACKLOG_PAGES = 32768


class LandingDigests:
    """One digest per page of ``memory``, kept as the stream writes it."""

    def __init__(self, memory: GuestMemory, seed: int) -> None:
        self.memory = memory
        self.keys = page_keys(seed)
        self.digests = np.zeros(memory.npages, dtype=np.uint64)
        self._queue: queue.Queue[tuple[Runs, int] | None] = queue.Queue()
        self._closed = False
        self._error: BaseException | None = None
        self.max_backlog = MAX_BACKLOG_PAGES
        self._backlog = 0  # data pages queued, not yet digested
        self._room = threading.Condition()
        self.waited_s = 0.0  # how long receivers waited for the worker to catch up
        self._worker = threading.Thread(target=self._work, name="landing-digests", daemon=True)
        self._worker.start()

    def landed(
        self,
        first: npt.NDArray[np.int64],
        npages: npt.NDArray[np.int64],
        is_zero: npt.NDArray[np.bool_],
    ) -> None:
        """A section's runs are in memory: queued for the worker (copies: the receiver's
        arrays may be views of a buffer it reuses). Waits while the worker is more than
        ``max_backlog`` data pages behind (a section alone may exceed it)."""
        if self._closed:
            return
        data = int(npages[~is_zero].sum())
        with self._room:
            if self._backlog and self._backlog + data > self.max_backlog:
                t0 = time.monotonic()
                self._room.wait_for(
                    lambda: (
                        self._closed
                        or not self._backlog
                        or self._backlog + data <= self.max_backlog
                    )
                )
                self.waited_s += time.monotonic() - t0
            self._backlog += data
        self._queue.put(((first.copy(), npages.copy(), is_zero.copy()), data))

    def drain(self) -> None:
        """Every landing queued so far is digested (before a comparison)."""
        self._queue.join()
        if self._error is not None:
            raise MigrationError(f"digesting the landed pages failed: {self._error}")

    def close(self) -> None:
        """Stop the worker (what is queued is dropped): the memory may go after this."""
        if self._closed:
            return
        with self._room:
            self._closed = True
            self._room.notify_all()  # a receiver waiting for room returns
        self._queue.put(None)
        self._worker.join()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            runs, data = item
            try:
                if not self._closed:
                    self.digest(*runs)
            except BaseException as e:  # reported by drain, on the loop's thread
                log.error("digesting landed pages failed: %r", e)
                self._error = e
            finally:
                with self._room:
                    self._backlog -= data
                    self._room.notify_all()
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

    def landed_data(self, first: int, data: memoryview) -> None:
        """Post-copy: pages [first, +len(data)/4096) landed with this content (the fault
        server's staging copy: guest RAM itself may not be read with the GIL held while
        pages are missing)."""
        rows = np.frombuffer(data, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)
        self.digests[first : first + rows.shape[0]] = digest_rows(rows, self.keys)

    def release(self) -> None:
        """The audit's verdict is in: the digests (8 bytes a page of RAM) are freed."""
        self.close()
        self.digests = np.zeros(0, dtype=np.uint64)

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
