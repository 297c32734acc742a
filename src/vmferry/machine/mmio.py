"""MMIO: guest-physical ranges outside RAM claimed by device register blocks."""

from __future__ import annotations

from typing import Protocol


class MmioDevice(Protocol):
    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class MmioBus:
    """Unclaimed addresses read all-ones and ignore writes, as on a PC bus."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, MmioDevice]] = []

    def register(self, base: int, size: int, device: MmioDevice) -> None:
        for b, n, _ in self._ranges:
            if base < b + n and b < base + size:
                raise ValueError(f"MMIO {base:#x}+{size:#x} overlaps {b:#x}+{n:#x}")
        self._ranges.append((base, size, device))

    def _find(self, addr: int) -> tuple[int, MmioDevice] | None:
        for base, size, dev in self._ranges:
            if base <= addr < base + size:
                return base, dev
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self._find(addr)
        if hit is None:
            return (1 << (8 * size)) - 1
        return hit[1].mmio_read(addr - hit[0], size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self._find(addr)
        if hit is not None:
            hit[1].mmio_write(addr - hit[0], size, value)
