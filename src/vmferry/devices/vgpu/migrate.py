"""The vGPU's migration stream: what each piece holds, and loading it on the destination.

- INIT (entering PRE_COPY): a header (identity, share size, how many VRAM pieces follow),
  then the whole VRAM share as views of at most 64 MiB, copied as the stream reads them.
- DIRT (during PRE_COPY): VRAM pages the engine or the aperture wrote since they were last
  saved: ``u32 n, n × u32 page, n × 4 KiB``.
- FINL (entering STOP_COPY): the state — registers from the shadows, the GGTT as the
  guest programmed it, fence registers, scheduler accounting — then either the last dirty
  VRAM pages (with pre-copy) or the whole share (stop-copy only).

The destination stages VRAM straight into its own share as pieces arrive and checks at
commit that the whole share arrived exactly once and the state is complete.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from vmferry.devices.base import DeviceError, DeviceIdentity
from vmferry.devices.stream import MAX_PIECE, PIECE_DIRTY, PIECE_FINAL, PIECE_INITIAL, Chunk
from vmferry.devices.vgpu.types import GPU_PAGE
from vmferry.devices.vgpu.vram import PIECE, VramShare

HEAD = struct.Struct("<I")
# Dirty pages per piece: the piece (header + indices + data) stays under 64 MiB.
PAGES_PER_PIECE = (MAX_PIECE - 4096) // (GPU_PAGE + 4)


def json_piece(obj: dict[str, Any], tail: bytes = b"") -> bytes:
    head = json.dumps(obj).encode()
    return HEAD.pack(len(head)) + head + tail


def parse_json_piece(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = HEAD.unpack_from(data)
    obj = json.loads(data[HEAD.size : HEAD.size + n])
    if not isinstance(obj, dict):
        raise ValueError("the piece header is not an object")
    return obj, data[HEAD.size + n :]


def dirty_pieces(vram: VramShare, limit: int | None = None) -> list[bytes]:
    """Dirty VRAM pages as pieces, cleared as taken (bits first, then the copy)."""
    out: list[bytes] = []
    while limit is None or len(out) < limit:
        pages = vram.take_dirty(PAGES_PER_PIECE)
        if not pages.size:
            break
        out.append(HEAD.pack(pages.size) + pages.astype("<u4").tobytes() + vram.pages_data(pages))
    return out


def dirty_bytes(npages: int) -> int:
    pieces = -(-npages // PAGES_PER_PIECE)
    return npages * (GPU_PAGE + 4) + 4 * pieces


def store_dirty(vram: VramShare, data: bytes) -> None:
    (n,) = HEAD.unpack_from(data)
    if len(data) != HEAD.size + n * (4 + GPU_PAGE):
        raise ValueError(f"{n} dirty VRAM pages in a piece of {len(data)} bytes")
    pages = np.frombuffer(data, dtype="<u4", count=n, offset=HEAD.size).astype(np.int64)
    vram.store_pages(pages, data[HEAD.size + 4 * n :])


class VgpuLoader:
    """Destination side: parses pieces in order, stages VRAM, and says what is missing."""

    def __init__(self, name: str, identity: DeviceIdentity, vram: VramShare) -> None:
        self.name = name
        self.identity = identity
        self.vram = vram
        self.vram_pos = 0  # raw VRAM bytes staged so far (INIT, or FINL without pre-copy)
        self.expect_raw: str | None = None  # which kind of piece the raw VRAM comes in
        self.raw_left = 0
        self.tail_left = 0  # FINL pieces still due after the state
        self.tail_kind = ""
        self.state: dict[str, Any] | None = None
        self.ggtt: tuple[np.ndarray, np.ndarray] | None = None

    def accept(self, kind: bytes, data: bytes) -> None:
        try:
            self._accept(kind, data)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise DeviceError(f"{self.name}: {kind.decode()} piece is malformed: {e}") from e

    def _accept(self, kind: bytes, data: bytes) -> None:
        if self.raw_left and kind.decode() == self.expect_raw:
            self._stage_raw(data)
        elif kind == PIECE_INITIAL:
            head, _ = parse_json_piece(data)
            self._check_identity(head)
            self._begin_raw("INIT", int(head["vram_pieces"]))
        elif kind == PIECE_DIRTY:
            store_dirty(self.vram, data)
        elif kind == PIECE_FINAL and self.state is None:
            self.state, tail = parse_json_piece(data)
            self._check_identity(self.state)
            n = int(self.state["ggtt"])
            if len(tail) != 16 * n:
                raise ValueError(f"{n} GGTT entries in {len(tail)} bytes")
            idx = np.frombuffer(tail, dtype="<i8", count=n)
            val = np.frombuffer(tail, dtype="<u8", count=n, offset=8 * n)
            self.ggtt = (idx.astype(np.int64), val.astype(np.uint64))
            self.tail_kind = str(self.state["vram"])
            self.tail_left = int(self.state["tail_pieces"])
            if self.tail_kind == "full":
                self._begin_raw("FINL", self.tail_left)
                self.tail_left = 0
        elif kind == PIECE_FINAL and self.tail_left and self.tail_kind == "dirty":
            store_dirty(self.vram, data)
            self.tail_left -= 1
        else:
            raise ValueError("piece out of order")

    def _check_identity(self, head: dict[str, Any]) -> None:
        why = DeviceIdentity.from_dict(head["identity"]).incompatibility(self.identity)
        if why:
            raise DeviceError(f"{self.name}: incompatible state: {why}")

    def _begin_raw(self, kind: str, pieces: int) -> None:
        if pieces != len(range(0, self.vram.size, PIECE)):
            raise ValueError(f"{pieces} VRAM pieces for a share of {self.vram.size} bytes")
        self.expect_raw, self.raw_left, self.vram_pos = kind, pieces, 0

    def _stage_raw(self, data: bytes) -> None:
        n = min(PIECE, self.vram.size - self.vram_pos)
        if len(data) != n:
            raise ValueError(f"VRAM piece of {len(data)} bytes at {self.vram_pos:#x}, not {n}")
        self.vram.bytes[self.vram_pos : self.vram_pos + n] = np.frombuffer(data, dtype=np.uint8)
        self.vram_pos += n
        self.raw_left -= 1

    def finish(self) -> dict[str, Any]:
        """The state, once everything it announced has arrived; else DeviceError."""
        if self.state is None or self.ggtt is None:
            raise DeviceError(f"{self.name}: the stream has no final state")
        if self.raw_left or self.tail_left or self.vram_pos != self.vram.size:
            raise DeviceError(
                f"{self.name}: VRAM is incomplete ({self.vram_pos} of {self.vram.size} bytes, "
                f"{self.raw_left + self.tail_left} pieces missing)"
            )
        return self.state


def final_pieces(
    state: dict[str, Any], ggtt: tuple[np.ndarray, np.ndarray], vram: VramShare, precopy: bool
) -> list[Chunk]:
    idx, val = ggtt
    tail: list[Chunk]
    if precopy:
        tail = list(dirty_pieces(vram))
        state["vram"] = "dirty"
    else:
        vram.clear_dirty()
        tail = list(vram.pieces())
        state["vram"] = "full"
    state["tail_pieces"] = len(tail)
    state["ggtt"] = len(idx)
    head = json_piece(state, idx.astype("<i8").tobytes() + val.astype("<u8").tobytes())
    return [head, *tail]
