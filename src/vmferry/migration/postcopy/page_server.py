"""The source's side of post-copy: serve page requests first, push everything else.

After the switch the source's RAM is frozen. Two threads share one ``SentPages``: one
reads the destination's requests (a bad one stops post-copy with one clear error) and
answers each with the pages of it not sent yet; the other pushes every page not yet sent,
in runs of at most 64 KiB, stepping aside
while a request is being answered and carrying on just after the last requested page
(the guest is likely to want its neighbours next). The sent record is taken under one
lock before any byte goes out, so no page is ever sent twice.

Urgent and background runs may share one sink (one socket: a reply waits behind at most
the background run in flight plus what the socket buffers) or use two (QEMU's
postcopy-preempt channel); records on a shared sink never interleave.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmferry.errors import MigrationError, VmferryError
from vmferry.memory.guest_memory import PAGE_SHIFT, PAGE_SIZE
from vmferry.migration.postcopy.page_requests import (
    MAX_RUN_PAGES,
    REQUEST,
    PageRun,
    RunKind,
    decode_request,
    encode_run,
)
from vmferry.migration.postcopy.pages import Runs, SentPages
from vmferry.migration.transport import Sink, Source, StreamEndsEarly


class PageServerError(MigrationError):
    """Post-copy on the source stopped (the cause names the request or the channel)."""


@dataclass
class Served:
    requests: int = 0
    urgent_pages: int = 0
    background_pages: int = 0
    already_sent: int = 0  # requested pages that had gone out already (in flight or landed)

    @property
    def pages(self) -> int:
        return self.urgent_pages + self.background_pages


class _Channel:
    """A sink and the lock that keeps one record's header and data together on it."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.lock = threading.Lock()


def _same_endpoint(urgent: Sink, background: Sink) -> bool:
    """One sink, or two over one fd (their records must not interleave either)."""
    if background is urgent:
        return True
    fd = getattr(urgent, "fd", None)
    return fd is not None and fd == getattr(background, "fd", None)


class PageServer:
    """Serves ``ram`` (the frozen source RAM, one byte per element) to a destination."""

    def __init__(
        self,
        ram: npt.NDArray[np.uint8],
        requests: Source,
        urgent: Sink,
        background: Sink | None = None,
        *,
        sent: SentPages | None = None,
        max_bandwidth: float | None = None,
    ) -> None:
        if ram.size % PAGE_SIZE:
            raise PageServerError(f"source RAM of {ram.size} bytes is not whole pages")
        self.ram = ram
        self.sent = sent or SentPages(ram.size >> PAGE_SHIFT)
        self._requests = requests
        self._urgent = _Channel(urgent)
        self._background = self._urgent
        if background is not None and not _same_endpoint(urgent, background):
            self._background = _Channel(background)
        # On one socket the push steps aside while a request is answered (a lock alone
        # would let it take the socket back first); on two, both go at once.
        self._shared = self._background is self._urgent
        # A cap on what goes out after the switch (bytes/s), kept by pacing the push
        # alone: requests are never held back by it (QEMU's max-postcopy-bandwidth too
        # caps only its background transfer).
        self.max_bandwidth = max_bandwidth
        self.served = Served()
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._answering = False  # a request is being answered: the push waits
        self._cursor = 0  # where the background push goes next
        self._stopping = False
        self.pushed_all = threading.Event()
        self._threads = [
            threading.Thread(target=self._guard, args=(f,), name=n, daemon=True)
            for f, n in ((self._push, "pc-background"), (self._answer_requests, "pc-requests"))
        ]

    def start(self) -> PageServer:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop pushing; the request reader ends at its next request or when its channel
        is closed (``join`` waits for it)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._threads[0].ident is not None:
            self._threads[0].join(5)

    def join(self, timeout: float) -> None:
        """Wait for every thread, the request reader included (its channel closed)."""
        for t in self._threads:
            if t.ident is not None:
                t.join(timeout)

    def figures(self) -> dict[str, int]:
        """The source's query-migrate figures, with QEMU's names: ``ram.postcopy-requests``
        (page requests received) and ``ram.postcopy-bytes`` (page bytes sent since the
        switch, urgent and background)."""
        with self._cond:
            s = self.served
            return {"postcopy-requests": s.requests, "postcopy-bytes": s.pages * PAGE_SIZE}

    def wait_pushed(self, timeout: float) -> bool:
        """Whether every page has gone out (END sent) within ``timeout``; the error if the
        server failed."""
        ok = self.pushed_all.wait(timeout)
        if self.error is not None:
            raise PageServerError(f"post-copy's page server failed: {self.error}") from self.error
        return ok

    def _guard(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as e:  # the owner reads .error
            with self._cond:
                if self.error is None:
                    self.error = e
                self._stopping = True
                self._cond.notify_all()
            self.pushed_all.set()

    # ---- requests
    def _answer_requests(self) -> None:
        """Read each request and answer it on this thread: a hand-off to another thread
        would wait for the GIL behind the busy push (up to the 5 ms switch interval)."""
        raw = bytearray(REQUEST.size)
        while True:
            try:
                self._requests.readinto(memoryview(raw))
            except (StreamEndsEarly, OSError, ValueError):
                return  # the destination closed the return path: it needs nothing more
            req = decode_request(raw, self.ram.size)  # PageRequestError: post-copy stops
            with self._cond:
                if self._stopping:
                    return
                self._answering = True
                runs = self.sent.take(req.first_page, req.npages, MAX_RUN_PAGES)
                self._cursor = req.first_page + req.npages
                s = self.served
                s.requests += 1
                taken = int(runs[1].sum())
                s.urgent_pages += taken
                s.already_sent += req.npages - taken
            try:
                self._send(self._urgent, runs, RunKind.URGENT)
            finally:
                with self._cond:
                    self._answering = False
                    self._cond.notify_all()

    # ---- the background push
    def _push(self) -> None:
        t0 = time.monotonic()
        while True:
            self._pace(t0)
            with self._cond:
                while self._answering and self._shared and not self._stopping:
                    self._cond.wait()  # one socket: the answer goes out first
                if self._stopping:
                    return
                runs = self.sent.take_next(self._cursor, MAX_RUN_PAGES)
                if runs[0].size == 0:
                    break
                self._cursor = int(runs[0][0] + runs[1][0])
                self.served.background_pages += int(runs[1][0])
            self._send(self._background, runs, RunKind.BACKGROUND)
        with self._cond:  # an answer still going out is part of what END counts
            while self._answering and not self._stopping:
                self._cond.wait()
            total = self.served.pages
        end = encode_run(PageRun(0, total, RunKind.END))
        with self._background.lock:
            self._background.sink.write([end])
        self.pushed_all.set()

    def _pace(self, t0: float) -> None:
        """Sleep (GIL released) until the pages sent since ``t0``, answers included, fit
        the cap: the answers never wait for it, the push makes room for them. The cap is
        read again at every step (it may change, or go)."""
        while not self._stopping and (rate := self.max_bandwidth):
            left = t0 + self.served.pages * PAGE_SIZE / rate - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def _send(self, channel: _Channel, runs: Runs, kind: RunKind) -> None:
        for first, n in zip(runs[0].tolist(), runs[1].tolist(), strict=True):
            off = first << PAGE_SHIFT
            head = encode_run(PageRun(off, n, kind))
            data = memoryview(self.ram[off : off + n * PAGE_SIZE])  # type: ignore[arg-type]
            try:
                with channel.lock:
                    channel.sink.write([head, data])
            except (OSError, VmferryError) as e:
                raise PageServerError(
                    f"sending {kind.name.lower()} pages {first}+{n} failed: {e}"
                ) from e
