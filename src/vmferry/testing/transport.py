"""In-memory transports: what a stream writer wrote, read back without a socket or a file.

``MemorySink`` and ``MemorySource`` satisfy ``vmferry.migration.transport``'s ``Sink`` and
``Source``; ``memory_pipe`` connects a sink to a source across threads, as a socket would.
``socket_link`` is a ``Connector`` and an ``Acceptor`` (``vmferry.migration.connector``)
joined in kernel memory: a whole migration, TLS and reply path included, without TCP.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from vmferry.errors import MigrationError
from vmferry.migration.connector import Acceptor, Connector
from vmferry.migration.transport import Buffer, ExactReader, byte_view

# Rewrites one write's buffers before they are kept (a test damaging a stream in flight).
Tamper = Callable[[Sequence[Buffer]], Sequence[Buffer]]


def _closed(what: str) -> ValueError:
    return ValueError(f"I/O on a closed {what}")


class MemorySink:
    """Keeps every byte written, in order, in ``data`` (a test may edit it in place)."""

    def __init__(self, *, tamper: Tamper | None = None) -> None:
        self.data = bytearray()
        self.tamper = tamper
        self.written = 0  # bytes written, as FdSink counts them (``data`` may be cleared)
        self.writes = 0  # calls to write: a stream writer makes one per section
        self.closed = False

    def write(self, bufs: Sequence[Buffer]) -> None:
        if self.closed:
            raise _closed("MemorySink")
        if self.tamper is not None:
            bufs = self.tamper(bufs)
        # Copied now: the writer may hand over views of guest memory that change later.
        for b in bufs:
            view = memoryview(b).cast("B")
            self.data += view
            self.written += view.nbytes
        self.writes += 1

    def getvalue(self) -> bytes:
        return bytes(self.data)

    def view(self) -> memoryview:
        """The bytes kept so far, without a copy (valid until the next write or clear)."""
        return memoryview(self.data)

    def clear(self) -> None:
        self.data.clear()

    def close(self) -> None:
        self.closed = True


class MemorySource(ExactReader):
    """Reads ``data`` from the start, exactly as many bytes as asked for each time."""

    def __init__(self, data: Buffer, *, name: str = "stream") -> None:
        super().__init__(name)
        self._data = memoryview(data).cast("B")
        self.closed = False

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def readinto(self, buf: memoryview) -> None:
        if self.closed:
            raise _closed("MemorySource")
        view = byte_view(buf)
        n = len(view)
        if n > self.remaining:
            # FdSource's words: a reader cannot tell a buffer from a socket by its errors.
            raise self._ends_early(self.remaining, n)
        view[:] = self._data[self._pos : self._pos + n]
        self._pos += n

    def close(self) -> None:
        self.closed = True


class _Pipe:
    """The bytes in flight between a PipeSink and its PipeSource, and who has closed."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.buffer = bytearray()
        self.start = 0  # the first byte of ``buffer`` not read yet
        self.writer_closed = False
        self.reader_closed = False

    @property
    def available(self) -> int:
        return len(self.buffer) - self.start


class PipeSink:
    """The writing end of ``memory_pipe``: writes never block (the pipe is unbounded)."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe
        self.written = 0

    def write(self, bufs: Sequence[Buffer]) -> None:
        p = self._pipe
        with p.cond:
            if p.writer_closed:
                raise _closed("PipeSink")
            if p.reader_closed:
                raise BrokenPipeError("the reading end of the memory pipe is closed")
            for b in bufs:
                view = memoryview(b).cast("B")
                p.buffer += view
                self.written += view.nbytes
            p.cond.notify_all()

    def close(self) -> None:
        with self._pipe.cond:
            self._pipe.writer_closed = True
            self._pipe.cond.notify_all()


class PipeSource(ExactReader):
    """The reading end of ``memory_pipe``: a read waits for its bytes, up to ``timeout_s``
    (None: forever), and ends early only once the sink is closed."""

    def __init__(self, pipe: _Pipe, *, name: str, timeout_s: float | None) -> None:
        super().__init__(name)
        self._pipe = pipe
        self.timeout_s = timeout_s

    def readinto(self, buf: memoryview) -> None:
        view = byte_view(buf)
        n = len(view)
        p = self._pipe
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        with p.cond:
            if p.reader_closed:
                raise _closed("PipeSource")
            while p.available < n and not p.writer_closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"{self.name}: no {n - p.available} more bytes at byte "
                        f"{self._pos + p.available} within {self.timeout_s} s"
                    )
                p.cond.wait(left)
            if p.available < n:
                raise self._ends_early(p.available, n)
            view[:] = p.buffer[p.start : p.start + n]
            p.start += n
            self._pos += n
            if p.start > len(p.buffer) // 2:  # drop what was read, now and then
                del p.buffer[: p.start]
                p.start = 0

    def close(self) -> None:
        with self._pipe.cond:
            self._pipe.reader_closed = True
            self._pipe.cond.notify_all()


def memory_pipe(
    *, name: str = "stream", timeout_s: float | None = 30.0
) -> tuple[PipeSink, PipeSource]:
    """A connected sink and source: what one thread writes, another reads, in order.
    Closing the sink is the end of the stream; closing the source breaks the pipe."""
    pipe = _Pipe()
    return PipeSink(pipe), PipeSource(pipe, name=name, timeout_s=timeout_s)


LINK_BUFFER = 4 << 20  # as channel.connect asks of TCP: a migration is one bulk transfer


class _Link:
    """The connections made and not accepted yet (a listen backlog), and who has closed."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.backlog: deque[socket.socket] = deque()
        self.closed = False
        self.connections = 0  # made so far, accepted or not


class LinkConnector:
    """The source's end of ``socket_link``: each connect is a new AF_UNIX socket pair."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def connect(self, index: int, timeout_s: float) -> socket.socket:
        link = self._link
        with link.cond:
            if link.closed:
                raise MigrationError(
                    f"cannot connect to the destination (in-memory link, channel {index}): "
                    "it no longer accepts connections"
                )
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            for s in (mine, theirs):
                for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                    s.setsockopt(socket.SOL_SOCKET, opt, LINK_BUFFER)
            link.backlog.append(theirs)
            link.connections += 1
            link.cond.notify_all()
        return mine


class LinkAcceptor:
    """The destination's end of ``socket_link``: hands over the queued ends in order."""

    port = 0  # no port: nothing listens on the network

    def __init__(self, link: _Link) -> None:
        self._link = link

    @property
    def connections(self) -> int:
        return self._link.connections

    def accept(self, timeout_s: float | None, what: str) -> socket.socket:
        link = self._link
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with link.cond:
            while not link.backlog:
                if link.closed:
                    # What accept(2) on a shut-down listener raises (EINVAL).
                    raise OSError(22, "the in-memory link is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise MigrationError(f"no {what} connected within {timeout_s:.0f} s")
                link.cond.wait(left)
            return link.backlog.popleft()

    def close(self) -> None:
        """Wake a waiting accept; connections never accepted are closed (their source
        sees the end of the stream, as a reset backlog would show it)."""
        link = self._link
        with link.cond:
            link.closed = True
            while link.backlog:
                link.backlog.popleft().close()
            link.cond.notify_all()


def socket_link() -> tuple[Connector, Acceptor]:
    """A source's connector and a destination's acceptor joined without a network: each
    connect makes an AF_UNIX socket pair and queues one end for accept."""
    link = _Link()
    return LinkConnector(link), LinkAcceptor(link)
