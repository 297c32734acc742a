"""An IOMMU layout the DMA-gate tests share: one IOVA range over two RAM ranges that are
not contiguous, so a DMA across it is two pieces."""

from __future__ import annotations

from vmferry.devices.iommu import DirtyTracking, Iommu
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory

MiB = 1 << 20
SPLIT_IOVA = 0x1000_0000


def split_iommu(memory: GuestMemory) -> Iommu:
    """IOVA 0x10000000 + 8 KiB → RAM 1 MiB; the next 8 KiB → RAM 3 MiB (not contiguous).
    ``memory`` must reach past 3 MiB + 8 KiB."""
    iommu = Iommu(memory, DirtyTracking.IOMMU, identity=False)
    iommu.map(SPLIT_IOVA, 2 * PAGE_SIZE, 1 * MiB)
    iommu.map(SPLIT_IOVA + 2 * PAGE_SIZE, 2 * PAGE_SIZE, 3 * MiB)
    return iommu
