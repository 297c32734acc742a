"""A device's DMA dirty log as the migration engine sees it: start, collect at every sync,
stop. Which mechanism does the work (the IOMMU's A/D bits, the device's own VFIO DMA log
at the page size it chose, a mediator's parse, or nothing) is this module's business:
the engine never looks at a tracking mode (see iommu.py for what each one is).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import numpy as np

from vmferry.devices.base import DeviceError, DeviceModel
from vmferry.devices.iommu import DirtyTracking, Iommu, IovaMapping, cover_ranges
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)


class DmaDirtyLog(ABC):
    """What one device's DMA dirtied in RAM since the last collect (KVM cannot see it)."""

    mode: DirtyTracking
    page_size: int = PAGE_SIZE  # what one logged bit covers; RAM pages are always 4 KiB

    def __init__(self, device: DeviceModel) -> None:
        self.device = device

    @property
    def iommu(self) -> Iommu:
        return self.device.iommu

    def start(self) -> None:  # noqa: B027 - most mechanisms need no set-up
        """Begin tracking (before the first round)."""

    def stop(self) -> None:  # noqa: B027
        """End tracking (after the hand-over or a rollback); safe to call twice."""

    @abstractmethod
    def collect(self, into: DirtyBitmap) -> None:
        """OR the RAM pages DMA dirtied since the last collect into ``into``; clear them."""


class IommuDirtyLog(DmaDirtyLog):
    """The IOMMU's dirty bits (IOMMUFD HWPT_SET_DIRTY_TRACKING / GET_DIRTY_BITMAP)."""

    mode = DirtyTracking.IOMMU

    def start(self) -> None:
        self.iommu.set_dirty_tracking(True)

    def stop(self) -> None:
        self.iommu.set_dirty_tracking(False)

    def collect(self, into: DirtyBitmap) -> None:
        self.iommu.read_and_clear_dirty(into)


class DeviceDirtyLog(DmaDirtyLog):
    """The device logs its own writes (VFIO DMA logging), at the page size it chose: a
    coarse logged page dirties every RAM page of its block that a mapping reaches."""

    mode = DirtyTracking.DEVICE

    def __init__(self, device: DeviceModel) -> None:
        super().__init__(device)
        self._mappings: list[IovaMapping] = []
        self._blocks: list[tuple[int, int]] = []
        self._started = False

    def start(self) -> None:
        # Like VFIO's, the log covers what is mapped when it starts.
        self._mappings = self.iommu.mappings
        ranges = [(m.iova, m.size) for m in self._mappings]
        self.page_size = self.device.dma_logging_start(ranges, PAGE_SIZE)
        self._blocks = cover_ranges(ranges, self.page_size)
        self._started = True

    def stop(self) -> None:
        if self._started:
            self.device.dma_logging_stop()
            self._started = False

    def collect(self, into: DirtyBitmap) -> None:
        if self.iommu.mappings != self._mappings:
            # The log covers the mappings of its start only: a write through one mapped
            # since goes unlogged, so (as on a failed report) everything counts as dirty.
            log.warning(
                "%s: IOMMU mappings changed since the DMA log started; "
                "treating its memory as dirty",
                self.device.name,
            )
            self._all_dirty(into)
            return
        for iova, length in self._blocks:
            try:
                bits = self.device.dma_logging_report(iova, length)
            except DeviceError as e:
                # REFERENCE §2: any report error means everything it maps is dirty.
                log.warning(
                    "%s: DMA log report failed (%s); treating its memory as dirty",
                    self.device.name,
                    e,
                )
                self._all_dirty(into)
                return
            self._merge(into, iova, length, bits)

    def _all_dirty(self, into: DirtyBitmap) -> None:
        """Every page mapped now, and every page the log's own mappings reached."""
        into.set_pages(self.iommu.mapped_pages())
        for m in self._mappings:
            into.set_range(m.ram_offset >> PAGE_SHIFT, m.size >> PAGE_SHIFT)

    def _merge(self, into: DirtyBitmap, iova: int, length: int, bits: np.ndarray) -> None:
        ps = self.page_size
        inside = [m for m in self._mappings if m.iova < iova + length and iova < m.end]
        if ps == PAGE_SIZE and len(inside) == 1 and inside[0].iova == iova:
            m = inside[0]  # one bit per RAM page: merged word for word
            into.merge_at(m.ram_offset >> PAGE_SHIFT, bits, m.size >> PAGE_SHIFT)
            return
        logged = DirtyBitmap(length // ps)
        logged.words[:] = bits[: logged.words.size]
        block = iova + logged.pages() * ps  # IOVA of each dirty logged page
        for m in inside:
            lo = np.maximum(block, m.iova)
            hi = np.minimum(block + ps, m.end)
            hit = lo < hi
            first = (m.ram_offset + lo[hit] - m.iova) >> PAGE_SHIFT
            into.set_runs(first, (hi[hit] - lo[hit]) >> PAGE_SHIFT)


class MediatedDirtyLog(DmaDirtyLog):
    """The device's mediator reports the pages it saw the device will write."""

    mode = DirtyTracking.MEDIATED

    def collect(self, into: DirtyBitmap) -> None:
        into.set_pages(self.device.mediated_dirty_pages())


class UntrackedDirtyLog(DmaDirtyLog):
    """Nothing tracks DMA: every page the device can reach may have changed (holes in RAM
    excepted: a page DMA wrote to is no longer a hole)."""

    mode = DirtyTracking.NONE

    def collect(self, into: DirtyBitmap) -> None:
        reachable = self.iommu.mapped_pages()
        into.set_pages(np.intersect1d(reachable, self.iommu.memory.resident_pages()))


class BrokenDirtyLog(DmaDirtyLog):
    """Writes go untracked and nobody compensates (tests: verification must catch it)."""

    mode = DirtyTracking.BROKEN

    def collect(self, into: DirtyBitmap) -> None:
        return


_BY_MODE: dict[DirtyTracking, type[DmaDirtyLog]] = {
    c.mode: c
    for c in (IommuDirtyLog, DeviceDirtyLog, MediatedDirtyLog, UntrackedDirtyLog, BrokenDirtyLog)
}


def dma_dirty_log(device: DeviceModel) -> DmaDirtyLog:
    """The dirty log for a device, by the tracking its IOMMU domain was set up with."""
    return _BY_MODE[device.iommu.mode](device)
