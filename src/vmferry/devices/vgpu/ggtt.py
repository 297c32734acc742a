"""The graphics translation table: what the guest programmed, and the mediator's shadow.

A GGTT entry (64-bit) maps one 4 KiB GPU page: bit 0 VALID, bit 1 SYSTEM (guest RAM at a
guest-physical address; clear: the vGPU's VRAM at an offset in its share), bits 12–51 the
page address; every other bit is reserved and must be 0. The guest's table is kept as
written (it reads back as written); the shadow holds only entries that passed validation —
inside this vGPU's own VRAM share, or inside this guest's RAM — and is what the engine
translates through. A refused entry leaves its GPU page unmapped.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmferry.devices.vgpu.types import GPU_PAGE
from vmferry.memory.guest_memory import GuestMemory

VALID, SYSTEM = 1, 2
ADDR_MASK = 0x000F_FFFF_FFFF_F000
RESERVED = ~(ADDR_MASK | VALID | SYSTEM) & 0xFFFF_FFFF_FFFF_FFFF
KIND_NONE, KIND_VRAM, KIND_SYS = 0, 1, 2

Segment = tuple[int, int, int]  # (kind, VRAM offset or guest-physical address, length)


class GpuFault(Exception):
    """A GPU address with no valid translation (the scanner turns it into an error status)."""

    def __init__(self, gva: int, why: str) -> None:
        self.gva = gva
        super().__init__(f"GPU address {gva:#x}: {why}")


class Ggtt:
    def __init__(self, entries: int, vram_size: int, memory: GuestMemory) -> None:
        self.entries = entries
        self.vram_size = vram_size
        self.memory = memory
        self.guest = np.zeros(entries, dtype=np.uint64)  # as the guest wrote them
        self.kind = np.zeros(entries, dtype=np.uint8)  # the shadow
        self.addr = np.zeros(entries, dtype=np.int64)
        self.refused = 0

    def reset(self) -> None:
        self.guest[:] = 0
        self.kind[:] = KIND_NONE
        self.addr[:] = 0
        self.refused = 0

    # ---- programming (MMIO) and bulk loading (migration)
    def validate(
        self, values: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """Shadow (kind, address) for guest entries; refused ones come back KIND_NONE."""
        v = values.astype(np.uint64)
        addr = (v & np.uint64(ADDR_MASK)).astype(np.int64)
        valid = ((v & np.uint64(VALID)) != 0) & ((v & np.uint64(RESERVED)) == 0)
        sys = (v & np.uint64(SYSTEM)) != 0
        vram_ok = valid & ~sys & (addr + GPU_PAGE <= self.vram_size)
        in_ram = np.zeros(v.shape, dtype=bool)
        for r in self.memory.regions:
            in_ram |= (addr >= r.gpa) & (addr + GPU_PAGE <= r.gpa_end)
        sys_ok = valid & sys & in_ram
        kind = np.where(vram_ok, KIND_VRAM, np.where(sys_ok, KIND_SYS, KIND_NONE)).astype(np.uint8)
        return kind, np.where(kind != KIND_NONE, addr, 0)

    def write(self, index: int, value: int) -> bool:
        """Program one entry; False if the shadow refused it (the page is then unmapped)."""
        if not 0 <= index < self.entries:
            self.refused += 1
            return False
        kind, addr = self.validate(np.array([value], dtype=np.uint64))
        self.guest[index] = value
        self.kind[index] = kind[0]
        self.addr[index] = addr[0]
        refused = value != 0 and kind[0] == KIND_NONE  # 0 unmaps: not a refusal
        self.refused += int(refused)
        return not refused

    def load(self, indices: npt.NDArray[np.int64], values: npt.NDArray[np.uint64]) -> None:
        self.reset()
        if indices.size and (indices.min() < 0 or indices.max() >= self.entries):
            raise ValueError(f"GGTT index {int(indices.max())} is outside {self.entries} entries")
        self.guest[indices] = values
        self.kind[indices], self.addr[indices] = self.validate(values)

    def count(self) -> int:
        return int(np.count_nonzero(self.guest))

    def programmed(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        idx = np.flatnonzero(self.guest)
        return idx, self.guest[idx]

    # ---- translation (the scanner)
    def translate(self, gva: int, length: int) -> list[Segment]:
        """Contiguous pieces of [gva, gva+length), one per run of pages mapped back to back
        in the same memory (vectorised over pages; a loop per run)."""
        if length <= 0:
            return []
        first, last = gva // GPU_PAGE, (gva + length - 1) // GPU_PAGE
        if gva < 0 or last >= self.entries:
            raise GpuFault(gva, f"{length} bytes run past the GGTT ({self.entries} pages)")
        kind = self.kind[first : last + 1]
        addr = self.addr[first : last + 1]
        holes = np.flatnonzero(kind == KIND_NONE)
        if holes.size:
            raise GpuFault((first + int(holes[0])) * GPU_PAGE, "GPU page is not mapped")
        breaks = np.flatnonzero((np.diff(addr) != GPU_PAGE) | (np.diff(kind) != 0)) + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), kind.size]
        out: list[Segment] = []
        for s, e in zip(starts, ends, strict=True):
            lo = max(gva, (first + s) * GPU_PAGE)
            hi = min(gva + length, (first + e) * GPU_PAGE)
            out.append((int(kind[s]), int(addr[s]) + lo - (first + s) * GPU_PAGE, hi - lo))
        return out
