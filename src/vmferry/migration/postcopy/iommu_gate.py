"""A device's DMA on the destination during post-copy: request the pages, then touch them.

A device model reads and writes guest RAM through its IOMMU with numpy, holding the GIL: a
fault there on a missing page would stop every Python thread, the fault server's included.
So, as a PCIe device with ATS/PRI does, the DMA translates first, raises a page request
for whatever of the translated pieces is not present, and waits for it; only then does it
touch memory. A page once present stays present (post-copy never discards), so the access
that follows cannot fault.

``DmaPageGate`` is a ``devices.iommu.PageGate``: the destination sets it on every device's
IOMMU (``Iommu.set_page_gate``) before the devices start in post-copy and clears it once
every page is present; each read and write of the IOMMU then calls ``before_access`` (RAM
pieces in, returns once all are present). While the link is broken (postcopy-paused) a
DMA stays parked, as a vCPU on a missing page does: its timeout counts only time with the
link up (the fault server's ``wait_present`` stops the clock), so a pause of any length
fails no DMA; a fault server that fails for good does. ``GatedDma`` puts the gate in
front of one bare ``Iommu`` without setting it there (a caller's own DMA; the device
models need none).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from vmferry.devices.iommu import DmaFault, Iommu, PageGate
from vmferry.errors import VmferryError

# A page the source never sends, the link up, is a failed post-copy, not a hang (time
# paused on a broken link does not count).
DMA_PAGE_TIMEOUT_S = 10.0


class PageFetcher(Protocol):
    """What the gate needs of the destination's fault server (fault_server.FaultServer)."""

    def request(self, ram_offset: int, length: int) -> int: ...

    def wait_present(self, ram_offset: int, length: int, timeout: float) -> bool:
        """True once present; False after ``timeout`` s with the link up (a pause is
        not counted)."""
        ...


class DmaPageTimeout(DmaFault):
    """A DMA's pages did not arrive in time (post-copy's source is gone or stalled)."""


class DmaPageLost(DmaFault):
    """A DMA's pages will never arrive: the fault server failed (its error is the cause)."""


class DmaPageGate:
    """Makes a DMA wait until the RAM it will touch is present."""

    def __init__(self, pages: PageFetcher, *, timeout_s: float = DMA_PAGE_TIMEOUT_S) -> None:
        self.pages = pages
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # several devices' threads count here at once
        self.accesses = 0
        self.waited = 0  # accesses that had to ask for pages
        self.waited_s = 0.0

    def before_access(self, pieces: Sequence[tuple[int, int]], what: str = "DMA") -> None:
        """Each (ram_offset, length) piece present before returning; DmaPageTimeout if not,
        DmaPageLost if the fault server failed (both DMA faults to the device)."""
        t0 = time.monotonic()
        try:
            asked = sum(self.pages.request(off, n) for off, n in pieces)  # all out, then wait
            for off, n in pieces:
                # Each piece its own bound: a wall-clock deadline for all would count a
                # pause spent on an earlier piece (all were asked at once: the rest are
                # usually there by then).
                if not self.pages.wait_present(off, n, self.timeout_s):
                    raise DmaPageTimeout(
                        f"{what}: RAM {off:#x}+{n:#x} not present after {self.timeout_s:g} s "
                        "of post-copy with the link up (the page request went unanswered)"
                    )
        except DmaFault:
            raise
        except VmferryError as e:
            raise DmaPageLost(f"{what}: its pages cannot arrive: {e}") from e
        finally:
            with self._lock:
                self.accesses += 1
        if asked:
            with self._lock:
                self.waited += 1
                self.waited_s += time.monotonic() - t0


def gate_dma(iommus: Iterable[Iommu], gate: PageGate | None) -> None:
    """Set (or, with None, clear) one page gate on each IOMMU: every device's, before the
    devices start in post-copy; None once every page is present."""
    for iommu in iommus:
        iommu.set_page_gate(gate)


if TYPE_CHECKING:
    _GATE: type[PageGate] = DmaPageGate  # mypy: DmaPageGate satisfies the IOMMU's PageGate


class GatedDma:
    """An IOMMU's read and write, each behind the gate: translate, fetch, then touch (for a
    caller holding a bare Iommu; an Iommu with the gate set does the same by itself)."""

    def __init__(self, iommu: Iommu, gate: DmaPageGate) -> None:
        self.iommu = iommu
        self.gate = gate

    def read(self, iova: int, length: int) -> npt.NDArray[np.uint8]:
        self.gate.before_access(self.iommu.translate(iova, length), f"DMA read {iova:#x}")
        return self.iommu.read(iova, length)

    def write(self, iova: int, data: npt.NDArray[np.uint8] | bytes) -> None:
        self.gate.before_access(self.iommu.translate(iova, len(data)), f"DMA write {iova:#x}")
        self.iommu.write(iova, data)
