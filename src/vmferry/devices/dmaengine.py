"""dmaengine: the DMA test device (docs/devices/dmaengine.md is its data sheet).

Descriptors are executed on a worker thread, by DMA through the IOMMU, so work is really
in flight when a pause comes; quiescing waits for it. KEY is write-only and IRQ_STATUS
clears on read, so the saved state comes from the register shadows, never from reads.
"""

from __future__ import annotations

import json
import struct
import threading
from typing import Any, ClassVar

import numpy as np

from vmferry.devices.base import DeviceError, DeviceIdentity, DeviceModel
from vmferry.devices.fsm import MigCap, MigState
from vmferry.devices.iommu import DmaFault, Iommu
from vmferry.devices.stream import PIECE_DIRTY, PIECE_FINAL, PIECE_INITIAL

ID = 0x45414D44  # "DMAE"
CAPS_BITS = 0b111
CTRL_ENABLE = 1
STATUS_BUSY, STATUS_ERROR = 1, 2
ERR_NONE, ERR_BAD_DESC, ERR_DMA_FAULT = 0, 1, 2
OP_COPY, OP_FILL, OP_CHECKSUM = 1, 2, 3
# What each opcode's DMA touches, besides its completion record.
TOUCHES = {OP_COPY: ("src", "dst"), OP_FILL: ("dst",), OP_CHECKSUM: ("src",)}
DESC = struct.Struct("<IIQQQQQQQ")  # opcode, flags, src, dst, len, value, completion, seq, rsvd
MAX_LEN = 16 << 20
TABLE_ENTRIES = 4096  # internal completion history: device state the guest never sees

REG_ID, REG_VERSION, REG_CAPS, REG_CTRL = 0x00, 0x04, 0x08, 0x0C
REG_RING_BASE, REG_RING_SIZE, REG_RING_TAIL, REG_RING_HEAD = 0x10, 0x18, 0x1C, 0x20
REG_STATUS, REG_IRQ_STATUS, REG_ERROR_CODE = 0x24, 0x28, 0x2C
REG_KEY, REG_COMPLETED = 0x30, 0x38

SHADOWED = (
    "ctrl",
    "ring_base",
    "ring_size",
    "ring_tail",
    "ring_head",
    "error",
    "irq_status",
    "error_code",
    "key",
    "completed",
)


def checksum(words: np.ndarray, seed: int, key: int) -> int:
    """Σ w_i·(2i+1) + seed, XOR key, all modulo 2**64 (numpy's uint64 arithmetic wraps)."""
    mult = np.arange(1, 2 * words.size, 2, dtype=np.uint64)
    total = int(np.sum(words * mult, dtype=np.uint64))
    return ((total + seed) & 0xFFFF_FFFF_FFFF_FFFF) ^ key


class DmaEngine(DeviceModel):
    model: ClassVar[str] = "dmaengine"
    version: ClassVar[int] = 1
    caps: ClassVar[MigCap] = MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY

    def __init__(self, name: str, iommu: Iommu, options: dict[str, str]) -> None:
        super().__init__(name, iommu, options)
        self._cv = threading.Condition()
        self._accepting = True
        self._busy = False
        self._alive = True
        self.table = np.zeros(TABLE_ENTRIES, dtype=np.uint64)
        self._table_dirty: set[int] = set()
        self._reset_registers()
        self._worker = threading.Thread(target=self._run, name=f"{name}-worker", daemon=True)
        self._worker.start()

    def _reset_registers(self) -> None:
        self.ctrl = self.ring_base = self.ring_size = self.ring_tail = self.ring_head = 0
        self.error = False
        self.irq_status = self.error_code = self.key = self.completed = 0

    def close(self) -> None:
        with self._cv:
            self._alive = False
            self._cv.notify_all()
        self._worker.join(5)

    # ---- registers
    def mmio_read(self, offset: int, size: int) -> int:
        if size == 8:
            return self.mmio_read(offset, 4) | (self.mmio_read(offset + 4, 4) << 32)
        with self._cv:
            if offset == REG_ID:
                return ID
            if offset == REG_VERSION:
                return self.identity.version
            if offset == REG_CAPS:
                return CAPS_BITS
            if offset == REG_CTRL:
                return self.ctrl
            if offset in (REG_RING_BASE, REG_RING_BASE + 4):
                return (self.ring_base >> (8 * (offset - REG_RING_BASE))) & 0xFFFFFFFF
            if offset == REG_RING_SIZE:
                return self.ring_size
            if offset == REG_RING_TAIL:
                return self.ring_tail
            if offset == REG_RING_HEAD:
                return self.ring_head
            if offset == REG_STATUS:
                busy = self.ring_head != self.ring_tail and bool(self.ctrl & CTRL_ENABLE)
                return (STATUS_BUSY if busy else 0) | (STATUS_ERROR if self.error else 0)
            if offset == REG_IRQ_STATUS:
                value, self.irq_status = self.irq_status, 0  # clear on read
                return value
            if offset == REG_ERROR_CODE:
                return self.error_code
            if offset in (REG_KEY, REG_KEY + 4):
                return 0  # write-only
            if offset in (REG_COMPLETED, REG_COMPLETED + 4):
                return (self.completed >> (8 * (offset - REG_COMPLETED))) & 0xFFFFFFFF
            return 0xFFFFFFFF

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.mmio_write(offset, 4, value & 0xFFFFFFFF)
            self.mmio_write(offset + 4, 4, value >> 32)
            return
        value &= 0xFFFFFFFF
        with self._cv:
            if offset == REG_CTRL:
                if value & CTRL_ENABLE and not self.ctrl & CTRL_ENABLE and self.error:
                    # Re-enabling after an error skips the bad descriptor.
                    self.error, self.error_code = False, ERR_NONE
                    self.ring_head = (self.ring_head + 1) & 0xFFFFFFFF
                self.ctrl = value & CTRL_ENABLE
            elif offset in (REG_RING_BASE, REG_RING_BASE + 4):
                shift = 8 * (offset - REG_RING_BASE)
                self.ring_base = (self.ring_base & ~(0xFFFFFFFF << shift)) | (value << shift)
            elif offset == REG_RING_SIZE:
                self.ring_size = value
            elif offset == REG_RING_TAIL:
                self.ring_tail = value
            elif offset in (REG_KEY, REG_KEY + 4):
                shift = 8 * (offset - REG_KEY)
                self.key = (self.key & ~(0xFFFFFFFF << shift)) | (value << shift)
            self._cv.notify_all()

    # ---- the engine
    def _ready(self) -> bool:
        return (
            self._accepting
            and bool(self.ctrl & CTRL_ENABLE)
            and not self.error
            and self.ring_head != self.ring_tail
            and self.ring_size >= 2
            and self.ring_size & (self.ring_size - 1) == 0
            and self.ring_size <= 4096
        )

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._alive and not self._ready():
                    self._cv.wait()
                if not self._alive:
                    return
                self._busy = True
                slot = self.ring_head % self.ring_size
                base, key = self.ring_base, self.key
            error = ERR_NONE
            result: tuple[int, int] | None = None
            try:
                result = self._execute(base + 64 * slot, key)
            except DmaFault:
                error = ERR_DMA_FAULT
            except DeviceError:
                error = ERR_BAD_DESC
            with self._cv:
                if error:
                    self.error, self.error_code = True, error
                else:
                    assert result is not None
                    seq, value = result
                    self.ring_head = (self.ring_head + 1) & 0xFFFFFFFF
                    self.completed += 1
                    self.irq_status += 1
                    idx = seq % TABLE_ENTRIES
                    self.table[idx] = value
                    self._table_dirty.add(idx)
                self._busy = False
                self._cv.notify_all()

    def _execute(self, desc_iova: int, key: int) -> tuple[int, int]:
        raw = self.iommu.read(desc_iova, DESC.size).tobytes()
        op, _flags, src, dst, length, value, completion, seq, _ = DESC.unpack(raw)
        if length == 0 or length > MAX_LEN or length % 8 or completion % 8:
            raise DeviceError(f"bad descriptor: length {length}, completion {completion:#x}")
        if self.iommu.page_gate is not None and op in TOUCHES:
            # A gated IOMMU (post-copy): every page of the work asked for at once, not
            # one round trip per access.
            at = {"src": src, "dst": dst}
            ranges = [(at[k], length) for k in TOUCHES[op]] + [(completion, 16)]
            self.iommu.request_pages(ranges, f"descriptor at {desc_iova:#x}")
        if op == OP_COPY:
            self.iommu.write(dst, self.iommu.read(src, length))
            result = length
        elif op == OP_FILL:
            self.iommu.write(dst, np.full(length // 8, value, dtype=np.uint64).view(np.uint8))
            result = length
        elif op == OP_CHECKSUM:
            result = checksum(self.iommu.read(src, length).view(np.uint64), value, key)
        else:
            raise DeviceError(f"bad descriptor: opcode {op}")
        self.iommu.write(completion, struct.pack("<QQ", seq, result))
        return seq, result

    def _set_accepting(self, on: bool) -> None:
        """Stop taking descriptors and wait for the one in flight (a safe point), or go on."""
        with self._cv:
            self._accepting = on
            self._cv.notify_all()
            while not on and self._busy:
                self._cv.wait()

    # ---- migration hooks
    def on_arc(self, cur: MigState, nxt: MigState) -> None:
        # Only RUNNING and PRE_COPY start new work; every other state is quiesced (P2P)
        # or stopped, and entering it drains what is in flight.
        self._set_accepting(nxt in (MigState.RUNNING, MigState.PRE_COPY))

    def device_reset(self) -> None:
        self._set_accepting(False)
        with self._cv:
            self._reset_registers()
            self.table[:] = 0
            self._table_dirty.clear()
        self._set_accepting(True)

    def config(self) -> dict[str, Any]:
        return {"table_entries": TABLE_ENTRIES}

    def _registers(self) -> dict[str, int]:
        with self._cv:
            return {k: int(getattr(self, k)) for k in SHADOWED}

    def save_initial(self) -> bytes:
        head = json.dumps(self.identity.to_dict()).encode()
        with self._cv:
            self._table_dirty.clear()
            table = self.table.tobytes()
        return struct.pack("<I", len(head)) + head + table

    def _take_dirty_entries(self) -> bytes:
        with self._cv:
            idx = np.array(sorted(self._table_dirty), dtype=np.uint64)
            self._table_dirty.clear()
            vals = self.table[idx.astype(np.int64)] if idx.size else np.zeros(0, np.uint64)
        return struct.pack("<I", idx.size) + idx.tobytes() + vals.tobytes()

    def save_dirty(self) -> bytes:
        with self._cv:
            if not self._table_dirty:
                return b""
        return self._take_dirty_entries()

    def dirty_estimate(self) -> int:
        with self._cv:
            return 4 + 16 * len(self._table_dirty)

    def save_final(self) -> bytes:
        regs = json.dumps(self._registers()).encode()
        return struct.pack("<I", len(regs)) + regs + self._take_dirty_entries()

    def final_estimate(self) -> int | None:
        return 512 + self.dirty_estimate()

    def load(self, pieces: list[tuple[bytes, bytes]]) -> None:
        table = self.table.copy()
        regs: dict[str, int] | None = None
        try:
            for kind, data in pieces:
                if kind == PIECE_INITIAL:
                    (n,) = struct.unpack_from("<I", data)
                    ident = DeviceIdentity.from_dict(json.loads(data[4 : 4 + n]))
                    why = ident.incompatibility(self.identity)
                    if why:
                        raise DeviceError(f"{self.name}: incompatible state: {why}")
                    raw = data[4 + n :]
                    if len(raw) != table.nbytes:
                        raise DeviceError(f"{self.name}: internal table is {len(raw)} bytes")
                    table[:] = np.frombuffer(raw, dtype=np.uint64)
                elif kind == PIECE_DIRTY:
                    self._apply_entries(table, data)
                elif kind == PIECE_FINAL:
                    (n,) = struct.unpack_from("<I", data)
                    regs = {k: int(v) for k, v in json.loads(data[4 : 4 + n]).items()}
                    self._apply_entries(table, data[4 + n :])
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise DeviceError(f"{self.name}: device state is malformed: {e}") from e
        if regs is None or set(regs) != set(SHADOWED):
            raise DeviceError(f"{self.name}: device state lacks its registers")
        with self._cv:
            for k in SHADOWED:
                setattr(self, k, regs[k])
            self.error = bool(regs["error"])
            self.table[:] = table
            self._table_dirty.clear()

    @staticmethod
    def _apply_entries(table: np.ndarray, data: bytes) -> None:
        (n,) = struct.unpack_from("<I", data)
        if len(data) != 4 + 16 * n:
            raise ValueError(f"{n} table entries in {len(data)} bytes")
        idx = np.frombuffer(data, dtype=np.uint64, count=n, offset=4).astype(np.int64)
        vals = np.frombuffer(data, dtype=np.uint64, count=n, offset=4 + 8 * n)
        if n and idx.max() >= TABLE_ENTRIES:
            raise ValueError("table index out of range")
        table[idx] = vals
