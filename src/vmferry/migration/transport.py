"""Byte transports under the stream: scatter-gather writes out, exact reads in.

Files and sockets are both plain fds, so one implementation serves ``file:`` and ``tcp:``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from vmferry.errors import StreamError

IOV_MAX = 1024
Buffer = bytes | bytearray | memoryview


class Sink(Protocol):
    def write(self, bufs: Sequence[Buffer]) -> None: ...

    def close(self) -> None: ...


class Source(Protocol):
    def readinto(self, buf: memoryview) -> None: ...

    @property
    def position(self) -> int: ...

    def close(self) -> None: ...


class FdSink:
    """Writes with writev(2), batching IOV_MAX buffers and finishing partial writes."""

    def __init__(self, fd: int, *, owned: bool = True) -> None:
        self.fd = fd
        self.owned = owned
        self.written = 0

    def write(self, bufs: Sequence[Buffer]) -> None:
        pending = [memoryview(b).cast("B") for b in bufs if len(b)]
        while pending:
            batch = pending[:IOV_MAX]
            n = os.writev(self.fd, batch)
            self.written += n
            # Drop what went out; keep the tail of a partly written buffer.
            i = 0
            while i < len(batch) and n >= len(batch[i]):
                n -= len(batch[i])
                i += 1
            pending = pending[i:]
            if n:
                pending[0] = pending[0][n:]

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class StreamEndsEarly(StreamError):
    """The stream ended (EOF) where more bytes were due: the writer closed or went away."""


class ExactReader:
    """What a source that reads exactly the bytes asked for keeps: its name for messages
    and how many bytes it has read (``position``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    def _ends_early(self, got: int, want: int) -> StreamEndsEarly:
        """The stream ended after ``got`` of the ``want`` bytes of this read."""
        return StreamEndsEarly(
            f"{self.name} ends early at byte {self._pos + got}: "
            f"{want - got} more bytes were expected"
        )


def byte_view(buf: memoryview) -> memoryview:
    """``buf`` as bytes (a read fills any buffer byte by byte)."""
    return buf.cast("B") if buf.format != "B" else buf


class FdSource(ExactReader):
    """Reads exactly the bytes asked for, straight into the caller's buffer."""

    def __init__(self, fd: int, *, owned: bool = True, name: str = "stream") -> None:
        super().__init__(name)
        self.fd = fd
        self.owned = owned

    def readinto(self, buf: memoryview) -> None:
        view = byte_view(buf)
        got = 0
        while got < len(view):
            n = os.readv(self.fd, [view[got:]])
            if n == 0:
                raise self._ends_early(got, len(view))
            got += n
        self._pos += got

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
