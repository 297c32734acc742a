"""A device's DMA on the destination during post-copy: request the pages, then touch them.

A device model reads and writes guest RAM through its IOMMU with numpy, holding the GIL: a
fault there on a missing page would stop every Python thread, the fault server's included.
So, as a PCIe device with ATS/PRI does, the DMA translates first, raises a page request
for whatever of the translated pieces is not present, and waits for it; only then does it
touch memory. A page once present stays present (post-copy never discards), so the access
that follows cannot fault.

``DmaPageGate`` is what the IOMMU model calls before an access (``before_access``: RAM
pieces in, returns once all are present). ``GatedDma`` wraps an ``Iommu`` with the gate
for models that are handed it instead of the IOMMU itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vmferry.devices.iommu import DmaFault, Iommu

DMA_PAGE_TIMEOUT_S = 10.0  # a page the source never sends is a failed post-copy, not a hang


class PageFetcher(Protocol):
    """What the gate needs of the destination's fault server (fault_server.FaultServer)."""

    def request(self, ram_offset: int, length: int) -> int: ...

    def wait_present(self, ram_offset: int, length: int, timeout: float) -> bool: ...


class DmaPageTimeout(DmaFault):
    """A DMA's pages did not arrive in time (post-copy's source is gone or stalled)."""


class DmaPageGate:
    """Makes a DMA wait until the RAM it will touch is present."""

    def __init__(self, pages: PageFetcher, *, timeout_s: float = DMA_PAGE_TIMEOUT_S) -> None:
        self.pages = pages
        self.timeout_s = timeout_s
        self.accesses = 0
        self.waited = 0  # accesses that had to ask for pages
        self.waited_s = 0.0

    def before_access(self, pieces: Sequence[tuple[int, int]], what: str = "DMA") -> None:
        """Each (ram_offset, length) piece present before returning; DmaPageTimeout if not."""
        self.accesses += 1
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        asked = sum(self.pages.request(off, n) for off, n in pieces)  # all out, then wait
        for off, n in pieces:
            left = max(0.0, deadline - time.monotonic())
            if not self.pages.wait_present(off, n, left):
                raise DmaPageTimeout(
                    f"{what}: RAM {off:#x}+{n:#x} not present after {self.timeout_s:g} s "
                    "of post-copy (the page request went unanswered)"
                )
        if asked:
            self.waited += 1
            self.waited_s += time.monotonic() - t0


class GatedDma:
    """An IOMMU's read and write, each behind the gate: translate, fetch, then touch."""

    def __init__(self, iommu: Iommu, gate: DmaPageGate) -> None:
        self.iommu = iommu
        self.gate = gate

    def read(self, iova: int, length: int) -> npt.NDArray[np.uint8]:
        self.gate.before_access(self.iommu.translate(iova, length), f"DMA read {iova:#x}")
        return self.iommu.read(iova, length)

    def write(self, iova: int, data: npt.NDArray[np.uint8] | bytes) -> None:
        self.gate.before_access(self.iommu.translate(iova, len(data)), f"DMA write {iova:#x}")
        self.iommu.write(iova, data)
