"""The guest pages a device can reach by DMA: DMA bypasses the dirty log, so the
pre-resume check digests them whatever the rounds sent."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmferry.machine.machine import Machine
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SHIFT


def reachable_bitmap(machine: Machine) -> DirtyBitmap:
    """Every page some device's IOMMU maps (all RAM by default), set from the mappings as
    runs: no array of page numbers (np.unique of 256K pages takes 0.3 s under numpy 2.4,
    and a device may map all of RAM)."""
    bm = DirtyBitmap(machine.memory.npages)
    for dev in machine.devices:
        maps = dev.iommu.mappings
        if maps:
            starts = np.array([m.ram_offset >> PAGE_SHIFT for m in maps], dtype=np.int64)
            lengths = np.array([m.size >> PAGE_SHIFT for m in maps], dtype=np.int64)
            bm.set_runs(starts, lengths)
    return bm


def reachable_pages(machine: Machine) -> npt.NDArray[np.int64]:
    """The pages of reachable_bitmap, sorted, once each."""
    if not machine.devices:
        return np.zeros(0, dtype=np.int64)
    return reachable_bitmap(machine).pages()


__all__ = ["reachable_bitmap", "reachable_pages"]
