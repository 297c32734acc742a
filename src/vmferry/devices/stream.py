"""A device's migration stream: framed pieces out (saving), parsed pieces in (resuming).

A piece is ``kind[4] | u32 length | data | u32 crc32(data)``. The saving side keeps
pieces as views of the device's memory and copies them out only as they are read — a
VRAM share of gigabytes is never duplicated — and computes each CRC over exactly the
bytes it hands out, so a page that changes meanwhile is caught by the device's own dirty
tracking, never by a false CRC error. The resuming side hands each piece to the device as
soon as it is complete, so the device can stage it where it belongs.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from collections.abc import Callable

from vmferry.errors import VmferryError

PIECE_HEAD = struct.Struct("<4sI")
PIECE_TAIL = struct.Struct("<I")
PIECE_INITIAL, PIECE_DIRTY, PIECE_FINAL = b"INIT", b"DIRT", b"FINL"
KINDS = (PIECE_INITIAL, PIECE_DIRTY, PIECE_FINAL)
MAX_PIECE = 64 << 20  # a device splits bigger state (VRAM) into several pieces

Chunk = bytes | bytearray | memoryview


class DeviceStreamError(VmferryError):
    """A device stream is malformed, corrupt or incomplete."""


def framed_size(n: int) -> int:
    return PIECE_HEAD.size + n + PIECE_TAIL.size


class SavingStream:
    """Pieces waiting to be read; counts what is left, and what of it is initial data."""

    def __init__(self) -> None:
        self._queue: deque[tuple[bytes, memoryview, bool]] = deque()
        self._off = 0  # position within the first piece's frame
        self._crc = 0
        self.pending = 0
        self.initial_left = 0

    def push(self, kind: bytes, data: Chunk, *, initial: bool = False) -> None:
        mv = memoryview(data).cast("B")
        if len(mv) > MAX_PIECE:
            raise DeviceStreamError(f"a device piece of {len(mv)} bytes exceeds {MAX_PIECE}")
        self._queue.append((kind, mv, initial))
        size = framed_size(len(mv))
        self.pending += size
        if initial:
            self.initial_left += size

    def read(self, max_bytes: int) -> bytes:
        out = bytearray()
        while self._queue and len(out) < max_bytes:
            kind, mv, initial = self._queue[0]
            n = len(mv)
            room = max_bytes - len(out)
            off = self._off
            if off < PIECE_HEAD.size:
                if off == 0:
                    self._crc = 0
                take: bytes = PIECE_HEAD.pack(kind, n)[off : off + room]
            elif off < PIECE_HEAD.size + n:
                take = bytes(mv[off - PIECE_HEAD.size : off - PIECE_HEAD.size + room])
                self._crc = zlib.crc32(take, self._crc)
            else:
                tail = PIECE_TAIL.pack(self._crc)
                take = tail[off - PIECE_HEAD.size - n : off - PIECE_HEAD.size - n + room]
            out += take
            self._off += len(take)
            self.pending -= len(take)
            if initial:
                self.initial_left -= len(take)
            if self._off == framed_size(n):
                self._queue.popleft()
                self._off = 0
        return bytes(out)


class ResumingStream:
    """Parses pieces as bytes arrive and hands each complete one to ``deliver``."""

    def __init__(self, deliver: Callable[[bytes, bytes], None], name: str) -> None:
        self.deliver = deliver
        self.name = name
        self._buf = bytearray()
        self.pieces = 0
        self.kinds: list[bytes] = []

    def feed(self, data: Chunk) -> None:
        self._buf += data
        while True:
            if len(self._buf) < PIECE_HEAD.size:
                return
            kind, n = PIECE_HEAD.unpack_from(self._buf)
            if kind not in KINDS or n > MAX_PIECE:
                raise DeviceStreamError(
                    f"{self.name}: device stream is malformed after {self.pieces} pieces "
                    f"(kind {bytes(kind)!r}, length {n})"
                )
            total = framed_size(n)
            if len(self._buf) < total:
                return
            body = bytes(self._buf[PIECE_HEAD.size : PIECE_HEAD.size + n])
            (crc,) = PIECE_TAIL.unpack_from(self._buf, PIECE_HEAD.size + n)
            if zlib.crc32(body) != crc:
                raise DeviceStreamError(
                    f"{self.name}: device stream piece {self.pieces} is corrupt (CRC mismatch)"
                )
            del self._buf[:total]
            self.pieces += 1
            self.kinds.append(bytes(kind))
            self.deliver(bytes(kind), body)

    def check_complete(self) -> None:
        if self._buf:
            raise DeviceStreamError(f"{self.name}: device stream ends inside a piece")
        if not self.kinds or self.kinds[-1] != PIECE_FINAL:
            raise DeviceStreamError(f"{self.name}: resuming stream is incomplete (no final state)")
