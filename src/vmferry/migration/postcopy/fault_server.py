"""The destination's side of post-copy: vCPU faults become page requests, pages land.

Guest RAM (a memfd) is registered with userfaultfd in missing mode before the VM resumes.
One thread polls the userfaultfd: each fault on a page neither present nor already asked
for becomes a ``PageRequest`` to the source; the faulting thread's wait is timed
(blocktime.py). One thread per page channel reads runs (urgent replies and the background
push, in the order the source sent them) into a 64 KiB staging buffer and lands them with
UFFDIO_COPY, then marks them present. A device's DMA does not fault: it asks through
``fetch`` (iommu_gate.py) and waits for the pages like a vCPU would.

Data lands only through COPY: a read(2) or a populate into registered RAM would fill the
hole with zeros (or fault inside the kernel on this thread), and the page's COPY would then
be refused as already there. And nothing here touches guest RAM with the GIL held.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from vmferry.errors import MigrationError, VmferryError
from vmferry.memory.dirty import DirtyBitmap, IntArray, page_runs
from vmferry.memory.guest_memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from vmferry.memory.userfaultfd import FaultBatch, UserFault
from vmferry.migration.liveness import is_timeout
from vmferry.migration.postcopy.blocktime import Blocktime
from vmferry.migration.postcopy.page_requests import (
    MAX_REQUEST_PAGES,
    MAX_RUN_PAGES,
    RUN,
    PageRequest,
    RunKind,
    decode_run,
    encode_request,
)
from vmferry.migration.postcopy.pages import (
    Bits,
    PresentPages,
    Runs,
    clip_runs,
    range_bits,
    runs_where,
)
from vmferry.migration.transport import Sink, Source, StreamEndsEarly

POLL_S = 0.05  # how often the fault thread looks at its stop flag
PAUSED_POLL_S = 0.5  # how often a DMA parked by a broken link looks whether it is back
# Called with (first page, the run's data) once a run has landed: the staging copy, which
# (unlike guest RAM) any thread may read with the GIL held: the audit digests it there.
LandedHook = Callable[[int, memoryview], None]


class FaultServerError(MigrationError):
    """Post-copy on the destination failed (the cause names the fault, the run, the page)."""


class LinkBroken(FaultServerError):
    """A page channel was reset or went silent (not closed): with ``pausable`` set the
    server waits for new channels (``reattach``) instead of failing."""


def bits_at(bitmap: DirtyBitmap, pages: IntArray) -> Bits:
    """Whether each of ``pages`` is set (gathered from its word, vectorised)."""
    return bitmap.test(pages)


@dataclass
class Landing:
    """What has arrived: pages COPY filled, pages found already there, runs by kind."""

    filled: int = 0
    already: int = 0
    urgent_runs: int = 0
    background_runs: int = 0
    received: int = 0  # pages in runs read from the source (filled + already)


class FaultServer:
    """Serves one guest's missing RAM from a source over ``requests`` and ``pages``."""

    def __init__(
        self,
        uf: UserFault,
        memory: GuestMemory,
        requests: Sink,
        pages: Sequence[Source],
        *,
        present: PresentPages | None = None,
        holes: PresentPages | None = None,
        vcpus: Collection[int] = (),
        on_landed: LandedHook | None = None,
    ) -> None:
        self.uf, self.memory = uf, memory
        self.on_landed = on_landed
        self._requests, self._channels = requests, list(pages)
        self.present = present or PresentPages(memory.npages)
        # Pages that are zero and not owed, with no page in the memfd (sent as zero pages,
        # or never sent: zero on the source too). A touch faults all the same, so this
        # server fills them with zeros itself, asking the source nothing. A hole is not
        # present until its zeros are in: ``present`` means "safe to touch", which a
        # DMA does with the GIL held (a touch of a missing page then stops the process).
        self.holes = holes or PresentPages(memory.npages)
        self._zeroing = PresentPages(memory.npages)  # holes a thread is filling now
        self.zero_filled = 0
        self._asked = PresentPages(memory.npages)  # requested, not landed yet
        self.blocktime = Blocktime.of(vcpus)
        self.landing = Landing()
        self.requests_sent = 0
        self.end_total: int | None = None  # pages the source says it sent, once it ends
        self._base = 0  # pages received over the links before this one
        self.error: BaseException | None = None
        # A reset or silent link pauses post-copy (a closed one fails it): the engine's.
        self.pausable = False
        self.peer_timeout_s = 0.0  # the channels' receive bound (x-peer-timeout), for lines
        self.broken: BaseException | None = None
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()  # complete, or failed
        self._present_waiters = 0
        self._threads = [threading.Thread(target=self._fault_loop, name="pc-faults", daemon=True)]
        self._threads += [
            threading.Thread(target=self._receive_loop, args=(c,), name=f"pc-land{i}", daemon=True)
            for i, c in enumerate(self._channels)
        ]

    def start(self) -> FaultServer:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop polling for faults (receivers end with their channels, closed by the owner)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._threads[0].ident is not None:
            self._threads[0].join(5)

    def join(self, timeout: float) -> None:
        """Wait for every thread, receivers included (after the owner closed the channels):
        guest RAM may be unmapped only once no COPY into it can be in progress."""
        for t in self._threads:
            if t.ident is not None:
                t.join(timeout)

    @property
    def lock(self) -> threading.Condition:
        """The records' lock (present, asked, holes): for a consistent copy of one."""
        return self._cond

    def set_vcpus(self, tids: Collection[int]) -> None:
        """The vCPU threads (known once they run): their waits make up the blocktime."""
        with self._cond:
            self.blocktime.vcpus = frozenset(tids)

    def figures(self) -> dict[str, int | list[int]]:
        """The destination's query-migrate figures, with QEMU's names and units (ms)."""
        with self._cond:
            bt = self.blocktime
            return {
                "postcopy-blocktime": round(bt.all_blocked_s * 1e3),
                "postcopy-vcpu-blocktime": [round(s * 1e3) for s in bt.vcpu_blocktime_s()],
                "postcopy-requests": self.requests_sent,
            }

    @property
    def complete(self) -> bool:
        """The source has ended and everything it sent (over this link) has landed."""
        return self.end_total is not None and self.landing.received - self._base >= self.end_total

    def _lost(self, e: BaseException) -> None:
        """A page channel broke: pause (pausable) or fail."""
        if not self.pausable:
            self._fail(e)
            return
        with self._cond:
            if self.broken is None:
                self.broken = e
            self._cond.notify_all()
        self._done.set()

    def detach(self, timeout: float) -> bool:
        """After a break: the receivers of the old link are waited for (their sockets
        shut down by the owner). Whether all have ended: one still running could land a
        page and count it, or call the new link broken, after a reattach."""
        for t in self._threads[1:]:
            if t.ident is not None:
                t.join(timeout)
        return not any(t.is_alive() for t in self._threads[1:])

    def reattach(self, requests: Sink, pages: Sequence[Source]) -> None:
        """A new link after a break: new receivers, and every page asked for that has not
        landed asked again (its answer may have been lost with the old link)."""
        with self._cond:
            self.broken = None
            self.end_total = None
            self._base = self.landing.received
            self._requests = requests
            self._done.clear()
            pending = self._asked.bitmap.copy()
            np.bitwise_and(pending.words, ~self.present.bitmap.words, out=pending.words)
        receivers = [
            threading.Thread(target=self._receive_loop, args=(c,), name=f"pc-land{i}", daemon=True)
            for i, c in enumerate(pages)
        ]
        self._threads[1:] = receivers
        for t in receivers:
            t.start()
        self._send_requests(page_runs(pending.pages()))

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = e
            self._cond.notify_all()
        self._done.set()
        self._stop.set()

    # ---- faults
    def _fault_loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self.uf.wait(POLL_S):
                    batch = self.uf.read_faults()
                    if len(batch):
                        self._on_faults(batch, time.monotonic())
        except BaseException as e:  # the owner reads .error; waiters are woken with it
            self._fail(e)

    def _on_faults(self, batch: FaultBatch, t: float) -> None:
        offsets = batch.address.astype(np.int64) - self.memory.host_addr
        bad = (offsets < 0) | (offsets >= self.memory.size)
        if bad.any():
            raise FaultServerError(
                f"fault at host address {int(batch.address[bad][0]):#x} is outside guest RAM "
                f"({self.memory.host_addr:#x}+{self.memory.size:#x})"
            )
        pages = offsets >> PAGE_SHIFT
        with self._cond:
            for tid, page in zip(batch.ptid.tolist(), pages.tolist(), strict=True):
                self.blocktime.blocked(tid, page, t)  # one entry per fault event, not per page
            distinct = np.unique(pages)
            here = bits_at(self.present.bitmap, distinct)
            hole = bits_at(self.holes.bitmap, distinct)
            need = distinct[~here & ~hole & ~bits_at(self._asked.bitmap, distinct)]
            runs = page_runs(need)
            self._asked.mark(runs)
            holes = self._take_holes(distinct[hole])
            for p in distinct[here].tolist():  # landed after the fault was queued: its
                self.blocktime.landed(p, 1, t)  # thread was woken by that COPY
        self._fill_zeros(holes)
        self._send_requests(runs)

    def _take_holes(self, holes: IntArray) -> Runs:
        """Of ``holes`` (pages still to be zero-filled), the runs no other thread is
        filling, now claimed by the caller (under the lock: each is filled once). The
        others' waiters wait for those threads' fills like for a landing."""
        if holes.size == 0:
            return page_runs(holes)
        claimed = page_runs(holes[~bits_at(self._zeroing.bitmap, holes)])
        self._zeroing.mark(claimed)
        return claimed

    def _fill_zeros(self, runs: Runs) -> None:
        """Zeros into claimed holes (UFFDIO_COPY from a zero page on shmem, which wakes
        their faulting threads); only then present, and the DMAs waiting told."""
        if runs[0].size == 0:
            return
        for a, n in zip(runs[0].tolist(), runs[1].tolist(), strict=True):
            try:
                self.uf.zeropage(self.memory.host_addr + (a << PAGE_SHIFT), n << PAGE_SHIFT)
            except (VmferryError, OSError) as e:  # its waiters would wait for ever
                err = FaultServerError(f"zero-filling the holes at pages {a}+{n} failed: {e}")
                self._fail(err)
                raise err from e
        t = time.monotonic()
        with self._cond:
            self.present.mark(runs)
            self.holes.bitmap.clear_runs(*runs)
            self._zeroing.bitmap.clear_runs(*runs)
            self.zero_filled += int(runs[1].sum())
            for a, n in zip(runs[0].tolist(), runs[1].tolist(), strict=True):
                self.blocktime.landed(a, n, t)
            self._check_end()
            if self._present_waiters:
                self._cond.notify_all()

    def _send_requests(self, runs: Runs) -> None:
        starts, lengths = clip_runs(runs, MAX_REQUEST_PAGES)
        if starts.size == 0:
            return
        records = [
            encode_request(PageRequest(a << PAGE_SHIFT, n))
            for a, n in zip(starts.tolist(), lengths.tolist(), strict=True)
        ]
        try:
            with self._send_lock:
                self._requests.write(records)
                self.requests_sent += len(records)
        except OSError as e:
            if self.pausable:  # asked again on the next link (they stay asked)
                self._lost(LinkBroken(f"sending page requests to the source failed: {e}"))
                return
            err = FaultServerError(f"sending page requests to the source failed: {e}")
            self._fail(err)  # every waiter learns it, not only this caller
            raise err from e
        except VmferryError as e:
            err = FaultServerError(f"sending page requests to the source failed: {e}")
            self._fail(err)
            raise err from e

    # ---- device waiters
    def request(self, ram_offset: int, length: int) -> int:
        """Ask for the pages of RAM [ram_offset, +length) that are neither present nor
        asked for already; returns how many were asked for."""
        first, count = _page_span(ram_offset, length, self.memory.size)
        with self._cond:
            here = range_bits(self.present.bitmap, first, count)
            hole = range_bits(self.holes.bitmap, first, count)
            bits = ~here & ~hole & ~range_bits(self._asked.bitmap, first, count)
            runs = runs_where(bits, first)
            self._asked.mark(runs)
            holes = self._take_holes(np.flatnonzero(hole) + first)
        self._fill_zeros(holes)  # present only once filled: the DMA waits for that
        self._send_requests(runs)
        return int(runs[1].sum())

    def fetch(self, ram_offset: int, length: int, timeout: float) -> bool:
        """``request`` then ``wait_present``: a waiter that is no vCPU (a device's DMA)."""
        self.request(ram_offset, length)
        return self.wait_present(ram_offset, length, timeout)

    def wait_present(self, ram_offset: int, length: int, timeout: float) -> bool:
        """Wait until every page of RAM [ram_offset, +length) is present; False once
        ``timeout`` has run out with the link up, or the server stopped. While the link is
        broken (postcopy-paused) the waiter stays parked, as a vCPU does, and its clock
        stops: it counts on after a reattach. Raises the server's error if it failed
        meanwhile (nothing would ever land)."""
        first, count = _page_span(ram_offset, length, self.memory.size)
        left = timeout
        with self._cond:
            self._present_waiters += 1
            try:
                while not self.present.holds(first, count):
                    if self.error is not None:
                        raise FaultServerError(f"post-copy failed: {self.error}") from self.error
                    if self._stop.is_set():
                        return False
                    if self.broken is not None:  # reattach does not wake us: look again
                        self._cond.wait(PAUSED_POLL_S)
                        continue
                    if left <= 0:
                        return False
                    t = time.monotonic()
                    self._cond.wait(left)  # a break wakes us (_lost): counted up to it
                    left -= time.monotonic() - t
            finally:
                self._present_waiters -= 1
        return True

    def wait_complete(self, timeout: float) -> bool:
        """Whether every page the source sent has landed within ``timeout``; the server's
        error if it failed."""
        self._done.wait(timeout)
        if self.error is not None:
            raise FaultServerError(f"post-copy failed: {self.error}") from self.error
        if self.broken is not None:
            raise LinkBroken(f"the link to the source broke: {self.broken}") from self.broken
        return self.complete

    # ---- landing
    def _receive_loop(self, channel: Source) -> None:
        staging = bytearray(MAX_RUN_PAGES * PAGE_SIZE)
        addr = ctypes.addressof((ctypes.c_char * len(staging)).from_buffer(staging))
        head = bytearray(RUN.size)
        ended = False  # this channel carried END: its closing is the expected end
        try:
            while True:
                channel.readinto(memoryview(head))
                run = decode_run(head, self.memory.size)
                if run.kind is RunKind.END:
                    self._ended(run.npages)
                    ended = True
                    continue
                channel.readinto(memoryview(staging)[: run.data_bytes])
                dst = self.memory.host_addr + run.ram_offset
                filled = self.uf.copy(dst, addr, run.data_bytes)
                if filled < run.data_bytes:
                    raise self._filled_behind(run.first_page, run.npages, filled)
                if self.on_landed is not None:
                    self.on_landed(run.first_page, memoryview(staging)[: run.data_bytes])
                self._landed(run.first_page, run.npages, filled // PAGE_SIZE, run.kind)
        except StreamEndsEarly as e:
            if self.broken is not None:
                return  # the link is known broken: shut down here to make a new one
            if not (ended or self.complete):
                self._fail(FaultServerError(f"the source closed a page channel early: {e}"))
        except VmferryError as e:
            if self.broken is None:
                self._fail(e)
        except OSError as e:
            if not (ended or self.complete):
                self._lost(LinkBroken(_channel_failed(channel, e, self.peer_timeout_s)))

    def _filled_behind(self, first: int, npages: int, filled: int) -> FaultServerError:
        """A run's COPY found pages already there. The source sends each page once, and
        only pages this server neither holds nor fills itself, so something else filled
        them (a read or populate of registered RAM): what they hold is unknown, and the
        staging copy's digest would vouch for data the guest does not see."""
        with self._cond:
            ours = range_bits(self.present.bitmap, first, npages)
            ours |= range_bits(self.holes.bitmap, first, npages)
            known = runs_where(ours, first)
        where = ", ".join(f"{a}+{n}" for a, n in zip(*(r.tolist() for r in known), strict=True))
        return FaultServerError(
            f"pages {first}+{npages} from the source: {npages - filled // PAGE_SIZE} of them "
            "were already in guest RAM here, filled behind the fault server's back ("
            + (f"pages {where} were its own" if where else "none by its own fills")
            + "): post-copy cannot vouch for them"
        )

    def _landed(self, first: int, npages: int, filled: int, kind: RunKind) -> None:
        t = time.monotonic()
        with self._cond:
            self.present.mark_range(first, npages)
            lg = self.landing
            lg.filled += filled
            lg.already += npages - filled
            lg.received += npages
            if kind is RunKind.URGENT:
                lg.urgent_runs += 1
            else:
                lg.background_runs += 1
            self.blocktime.landed(first, npages, t)
            self._check_end()
            if self._present_waiters:  # DMAs waiting; nobody to wake on most runs
                self._cond.notify_all()

    def _ended(self, total: int) -> None:
        with self._cond:
            self.end_total = total
            self._check_end()
            self._cond.notify_all()

    def _check_end(self) -> None:
        if not self.complete:
            return
        # Holes not touched yet stay holes (zero, filled here if ever touched).
        have = int(np.bitwise_count(self.present.bitmap.words | self.holes.bitmap.words).sum())
        if have < self.present.npages and self.error is None:
            missing = self.present.npages - have
            self.error = FaultServerError(
                f"the source ended after {self.end_total} pages, but {missing} pages of "
                "guest RAM never arrived"
            )
        self._done.set()  # a waiter on completion wakes once, not at every run


def _channel_failed(channel: Source, e: OSError, timeout_s: float) -> str:
    """A page channel's failure in words: a receive bound that ran out is a silent
    source (EAGAIN or ETIMEDOUT says nothing to a reader)."""
    if is_timeout(e):
        bound = f" for {timeout_s:g} s" if timeout_s else ""
        name = getattr(channel, "name", "a page channel")
        return f"the source stopped answering{bound} during post-copy (nothing on {name})"
    return f"page channel failed: {e}"


def _page_span(ram_offset: int, length: int, ram_size: int) -> tuple[int, int]:
    if ram_offset < 0 or length <= 0 or ram_offset + length > ram_size:
        raise FaultServerError(
            f"RAM {ram_offset:#x}+{length:#x} is outside guest RAM (0x0-{ram_size:#x})"
        )
    first = ram_offset >> PAGE_SHIFT
    return first, ((ram_offset + length - 1) >> PAGE_SHIFT) - first + 1
