"""The guest pages a device can reach by DMA: DMA bypasses the dirty log, so the
pre-resume check digests them whatever the rounds sent."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmferry.machine.machine import Machine


def reachable_pages(machine: Machine) -> npt.NDArray[np.int64]:
    """Every page some device's IOMMU maps (all RAM by default), sorted, once each."""
    maps = [d.iommu.mapped_pages() for d in machine.devices]
    return np.unique(np.concatenate(maps)) if maps else np.zeros(0, dtype=np.int64)


__all__ = ["reachable_pages"]
