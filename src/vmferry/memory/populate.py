"""Guest RAM allocated ahead of the data that lands in it, off the receiving path.

A destination's fresh memory costs more to allocate than the network does to fill it
(first touch runs at 1–2 GB/s on a VM whose balloon hands memory back), and a page
faulted in inside ``recv_into`` is faulted with the socket locked, so the sender stalls
too. A ``Populator`` pre-faults the RAM the source said holds data, in 2 MiB blocks (a
multifd channel's block), in the order the source sends it (ascending), on a thread of
its own (``MADV_POPULATE_WRITE`` releases the GIL), a bounded distance ahead of what has
landed. A receiver asks for the blocks of each batch before reading it (``ensure``):
blocks already done cost a lookup; blocks not reached yet it populates itself, so it
never waits for the populator for longer than one of its bursts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from vmferry.errors import VmferryError

log = logging.getLogger(__name__)

BLOCK_SHIFT = 21  # 2 MiB: a multifd channel's block (512 pages), so one channel per block
PAGE_BLOCK_SHIFT = BLOCK_SHIFT - 12
BURST_BLOCKS = 4  # the thread claims 8 MiB at a time: a receiver waits for at most that
DEFAULT_AHEAD = 256 << 20  # how far past what has landed the thread may run
SCAN_WINDOW = 1024  # blocks looked at per search for the next one to do

# A block's state; it only ever moves forward (NONE is not in the plan).
NONE, TODO, BUSY, DONE = 0, 1, 2, 3

#: populate(offset, length) -> False when it cannot go on (RAM closing, or the kernel has
#: no MADV_POPULATE_WRITE: pages then fault in as they are written); raises OSError.
PopulateFn = Callable[[int, int], bool]


def populates_ahead(receivers: int, cpus: int) -> bool:
    """Whether a thread populating ahead pays: only when the receiving threads leave it a
    CPU. Measured on a 2-core host (docs/benchmarks.md): with one receiving thread it made
    round 0 faster; with two it only shared their cores (and the kernel's allocation
    locks), and receiving straight into fresh memory was faster and took less CPU."""
    return receivers < cpus


class PopulateError(VmferryError):
    """Guest RAM could not be allocated on this host (the migration cannot land)."""


def plan_pieces(
    ranges: Sequence[tuple[int, int]], size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The [start, end) ranges, clipped to RAM, sorted, cut at block boundaries: each
    piece lies in one block (vectorised: a range of 1 GiB is 512 pieces, not a loop)."""
    if not ranges:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    r = np.clip(r, 0, size)
    r = r[r[:, 1] > r[:, 0]]
    r = r[np.argsort(r[:, 0], kind="stable")]
    starts, ends = r[:, 0], r[:, 1]
    b0, b1 = starts >> BLOCK_SHIFT, (ends - 1) >> BLOCK_SHIFT
    counts = b1 - b0 + 1
    which = np.repeat(np.arange(starts.size), counts)
    first_of = np.repeat(np.cumsum(counts) - counts, counts)
    blocks = b0[which] + (np.arange(which.size) - first_of)
    p_start = np.maximum(starts[which], blocks << BLOCK_SHIFT)
    p_end = np.minimum(ends[which], (blocks + 1) << BLOCK_SHIFT)
    return p_start, p_end


def merged(starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Sorted pieces with touching ones joined: one madvise per stretch, not per block."""
    if not starts.size:
        return []
    brk = np.flatnonzero(starts[1:] != ends[:-1]) + 1
    lo = np.concatenate(([0], brk))
    hi = np.concatenate((brk, [starts.size]))
    return list(zip(starts[lo].tolist(), ends[hi - 1].tolist(), strict=True))


class Populator:
    """Pre-faults ``ranges`` of a RAM of ``size`` bytes through ``populate``, ahead of
    the receivers. ``ahead``: bytes past the last block a receiver asked for that the
    thread may populate (None: no bound)."""

    def __init__(
        self,
        size: int,
        ranges: Sequence[tuple[int, int]],
        populate: PopulateFn,
        *,
        ahead: int | None = DEFAULT_AHEAD,
    ) -> None:
        self._populate = populate
        self._starts, self._ends = plan_pieces(ranges, size)
        self._piece_block = self._starts >> BLOCK_SHIFT
        nblocks = (size + (1 << BLOCK_SHIFT) - 1) >> BLOCK_SHIFT
        self._state = np.full(nblocks, NONE, dtype=np.uint8)
        self._state[self._piece_block] = TODO
        self._ahead = None if ahead is None else max(1, ahead >> BLOCK_SHIFT)
        self._cond = threading.Condition()
        self._cursor = int(self._piece_block[0]) if self._piece_block.size else nblocks
        self._front = self._cursor  # the furthest block a receiver has asked for
        self._stopping = False
        self.finished = not self._piece_block.size  # nothing left to do, or given up
        self.error: PopulateError | None = None
        self._reported = False
        self._thread: threading.Thread | None = None

    # ---- the thread
    def start(self) -> Populator:
        if not self.finished:
            self._thread = threading.Thread(target=self._run, name="populate", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        # Not SCHED_IDLE: measured, a thread that runs only on spare CPU leaves the
        # receivers to fault everything in on a busy host, which is slower still.
        while (claim := self._claim_next()) is not None:
            lo, hi = claim
            if not self._fill(lo, hi):
                return
            with self._cond:
                self._state[lo:hi] = DONE
                self._cond.notify_all()

    def _claim_next(self) -> tuple[int, int] | None:
        """The next blocks to do (up to a burst, contiguous), marked BUSY; None at the end."""
        with self._cond:
            while True:
                if self._stopping or self.finished:
                    return None
                n = self._state.size
                window = self._state[self._cursor : self._cursor + SCAN_WINDOW]
                todo = np.flatnonzero(window == TODO)
                if not todo.size:
                    self._cursor += window.size
                    if self._cursor >= n:
                        self._finish()
                        return None
                    continue
                lo = self._cursor + int(todo[0])
                if self._ahead is not None and lo > self._front + self._ahead:
                    self._cond.wait()  # a receiver's ensure (or stop) wakes it
                    continue
                limit = lo + BURST_BLOCKS
                if self._ahead is not None:
                    limit = min(limit, self._front + self._ahead + 1)
                run = self._state[lo:limit] == TODO
                hi = lo + (int(np.argmin(run)) if not run.all() else run.size)
                self._state[lo:hi] = BUSY
                self._cursor = hi
                return lo, hi

    def _finish(self) -> None:
        self.finished = True
        self._cond.notify_all()

    def _fill(self, lo: int, hi: int) -> bool:
        """Populate the planned pieces of blocks [lo, hi); False if it must stop."""
        a = int(np.searchsorted(self._piece_block, lo, "left"))
        b = int(np.searchsorted(self._piece_block, hi, "left"))
        try:
            for start, end in merged(self._starts[a:b], self._ends[a:b]):
                if not self._populate(start, end - start):
                    with self._cond:
                        self._finish()  # RAM is closing, or no MADV_POPULATE_WRITE here
                    return False
        except OSError as e:
            err = PopulateError(
                f"cannot allocate guest RAM at offset {lo << BLOCK_SHIFT:#x} on this host: "
                f"{e.strerror or e}"
            )
            with self._cond:
                if self.error is None:
                    self.error = err
                self._finish()
            return False
        return True

    # ---- the receivers
    def ensure(self, first: npt.NDArray[np.int64], npages: npt.NDArray[np.int64]) -> None:
        """Before pages [first[i], first[i]+npages[i]) are written: their planned blocks
        populated. Blocks the thread has not reached are populated here (on the caller's
        thread: no fault inside the socket read); blocks it is doing are waited for (one
        burst at most). Raises the PopulateError if allocating RAM failed."""
        if self.finished and self.error is None:
            return
        if not first.size:
            return
        b0 = first >> PAGE_BLOCK_SHIFT
        b1 = (first + npages - 1) >> PAGE_BLOCK_SHIFT
        if (b1 == b0).all():
            blocks = np.unique(b0)
        else:
            counts = b1 - b0 + 1
            which = np.repeat(np.arange(b0.size), counts)
            offs = np.arange(which.size) - np.repeat(np.cumsum(counts) - counts, counts)
            blocks = np.unique(b0[which] + offs)
        blocks = blocks[(blocks >= 0) & (blocks < self._state.size)]
        with self._cond:
            if blocks.size and int(blocks[-1]) > self._front:
                self._front = int(blocks[-1])
                self._cond.notify_all()  # the thread may be waiting for the front to move
            self._raise_error()
            mine = blocks[self._state[blocks] == TODO]
            self._state[mine] = BUSY
        for lo, hi in merged(mine, mine + 1):
            if not self._fill(lo, hi):
                break
        with self._cond:
            self._state[mine] = DONE
            self._cond.notify_all()
            # The thread's burst in progress (8 MiB at most): waited for, not faulted
            # into alongside it.
            while (self._state[blocks] == BUSY).any() and not (self.finished or self._stopping):
                self._cond.wait()
            self._raise_error()

    def _raise_error(self) -> None:
        if self.error is not None:
            self._reported = True
            raise self.error

    # ---- the end
    def stop(self) -> None:
        """Stop (the migration ended or failed): the thread ends after its burst."""
        with self._cond:
            self._stopping = True
            self.finished = True  # a receiver after this writes into whatever is there
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.error is not None and not self._reported:
            # Nothing that landed needed it, but the host is short of memory: say so.
            log.warning("pre-faulting guest RAM stopped: %s", self.error)
            self._reported = True

    def done_blocks(self) -> int:
        return int(np.count_nonzero(self._state == DONE))
