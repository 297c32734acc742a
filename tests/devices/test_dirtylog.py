"""A device's DMA dirty log as the engine sees it: one contract over every tracking mode,
and a device's own log at the page size it chose (a coarse page dirties its whole block)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from vmferry.devices.base import DeviceError, DeviceModel
from vmferry.devices.dirtylog import DeviceDirtyLog, DmaDirtyLog, dma_dirty_log
from vmferry.devices.dmaengine import DmaEngine
from vmferry.devices.iommu import DirtyTracking, Iommu, cover_ranges
from vmferry.devices.registry import DeviceSpec, create_device
from vmferry.errors import ConfigError
from vmferry.memory import DirtyBitmap, GuestMemory
from vmferry.memory.guest_memory import PAGE_SIZE

MIB = 1 << 20
BLOCK = 2 * MIB
PAGES_PER_BLOCK = BLOCK // PAGE_SIZE  # 512


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory(32 * MIB)
    yield mem
    mem.close()


def device(memory: GuestMemory, spec: str) -> DeviceModel:
    return create_device(DeviceSpec.parse(spec), 0, memory)


def collected(lg: DmaDirtyLog, npages: int) -> list[int]:
    got = DirtyBitmap(npages)
    lg.collect(got)
    return [int(p) for p in got.pages()]


def test_cover_ranges_widens_to_blocks_and_merges_the_shared_ones() -> None:
    assert cover_ranges([(0, 4096)], BLOCK) == [(0, BLOCK)]
    assert cover_ranges([(BLOCK + 4096, 8192), (BLOCK + MIB, 4096)], BLOCK) == [(BLOCK, BLOCK)]
    assert cover_ranges([(0, BLOCK), (2 * BLOCK, 4096)], BLOCK) == [(0, BLOCK), (2 * BLOCK, BLOCK)]
    assert cover_ranges([(0, 8192), (8192, 4096)], PAGE_SIZE) == [(0, 12288)]


@pytest.mark.parametrize("mode", list(DirtyTracking))
def test_each_mode_has_a_log_the_engine_drives_alike(
    memory: GuestMemory, mode: DirtyTracking
) -> None:
    dev = device(
        memory,
        f"vgpu,dirty={mode.value}"
        if mode is DirtyTracking.MEDIATED
        else f"dmaengine,dirty={mode.value}",
    )
    try:
        lg = dma_dirty_log(dev)
        assert lg.mode is mode and isinstance(lg, DmaDirtyLog)
        memory.write_gpa(8 * MIB, b"resident")  # a page with data, for the untracked mode
        lg.start()
        dev.iommu.write(4 * MIB + 10, b"dma")
        pages = collected(lg, memory.npages)
        want = {
            DirtyTracking.IOMMU: [4 * MIB // PAGE_SIZE],
            DirtyTracking.DEVICE: [4 * MIB // PAGE_SIZE],
            DirtyTracking.BROKEN: [],
        }
        if mode in want:
            assert pages == want[mode]
            assert collected(lg, memory.npages) == [], "collect did not clear"
        elif mode is DirtyTracking.MEDIATED:
            assert pages == [], "the vGPU's mediator saw no command that writes"
        elif mode is DirtyTracking.NONE:
            # every reachable page that holds data, at every sync
            assert {4 * MIB // PAGE_SIZE, 8 * MIB // PAGE_SIZE} <= set(pages)
            assert collected(lg, memory.npages) == pages
        lg.stop()
        lg.stop()  # twice is harmless (a rollback after a release)
    finally:
        dev.close()


def test_a_device_may_choose_a_2mib_log_page(memory: GuestMemory) -> None:
    dev = device(memory, "dmaengine,dirty=device,x-dma-log-page=2M")
    try:
        lg = dma_dirty_log(dev)
        lg.start()
        assert lg.page_size == BLOCK, "the engine keeps the page size the device chose"
        dev.iommu.write(3 * BLOCK + 12345, b"x")  # one byte in block 3
        pages = collected(lg, memory.npages)
        assert pages == list(range(3 * PAGES_PER_BLOCK, 4 * PAGES_PER_BLOCK))
        assert collected(lg, memory.npages) == []
    finally:
        dev.close()


def test_a_4k_log_page_marks_only_the_page_written(memory: GuestMemory) -> None:
    dev = device(memory, "dmaengine,dirty=device")
    try:
        lg = dma_dirty_log(dev)
        lg.start()
        assert lg.page_size == PAGE_SIZE
        dev.iommu.write(3 * BLOCK + 12345, b"x")
        assert collected(lg, memory.npages) == [(3 * BLOCK + 12345) // PAGE_SIZE]
    finally:
        dev.close()


def test_a_coarse_block_shared_by_two_mappings_dirties_both_parts(memory: GuestMemory) -> None:
    """Two IOVA mappings in one 2 MiB block, to RAM far apart: a write through one
    dirties the block, read once, and each mapping's part of it lands in RAM."""
    iommu = Iommu(memory, DirtyTracking.DEVICE, identity=False)
    iommu.map(0, MIB, 10 * MIB)  # IOVA [0, 1M) → RAM at 10 MiB
    iommu.map(MIB, MIB, 20 * MIB)  # IOVA [1M, 2M) → RAM at 20 MiB
    dev = DmaEngine("dmaengine0", iommu, {"dirty": "device", "x-dma-log-page": "2M"})
    try:
        lg = DeviceDirtyLog(dev)
        lg.start()
        iommu.write(MIB + 5, b"y")
        pages = collected(lg, memory.npages)
        first = list(range(10 * MIB // PAGE_SIZE, 11 * MIB // PAGE_SIZE))
        second = list(range(20 * MIB // PAGE_SIZE, 21 * MIB // PAGE_SIZE))
        assert pages == first + second
    finally:
        dev.close()


def test_a_failed_report_makes_everything_mapped_dirty(
    memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = device(memory, "dmaengine,dirty=device,x-dma-log-page=2M")
    try:
        lg = dma_dirty_log(dev)
        lg.start()

        def refuse(iova: int, length: int) -> np.ndarray:
            raise DeviceError("report refused")

        monkeypatch.setattr(dev, "dma_logging_report", refuse)
        assert collected(lg, memory.npages) == dev.iommu.mapped_pages().tolist()
    finally:
        dev.close()


@pytest.mark.parametrize("page", ["3000", "6K", "1K"])
def test_a_log_page_that_is_no_power_of_two_of_4k_is_refused(page: str) -> None:
    with pytest.raises(ConfigError, match="x-dma-log-page"):
        DeviceSpec.parse(f"dmaengine,dirty=device,x-dma-log-page={page}")


@pytest.mark.parametrize("change", ["map", "unmap"])
def test_mappings_changed_since_the_start_make_everything_mapped_dirty(
    memory: GuestMemory, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The log covers the mappings as they were at its start: a write through a mapping
    added since is in no log, so every page mapped (then or now) counts as dirty."""
    iommu = Iommu(memory, DirtyTracking.DEVICE, identity=False)
    iommu.map(0, MIB, 10 * MIB)
    if change == "unmap":
        iommu.map(MIB, MIB, 20 * MIB)
    dev = DmaEngine("dmaengine0", iommu, {"dirty": "device"})
    try:
        lg = DeviceDirtyLog(dev)
        lg.start()
        assert collected(lg, memory.npages) == []
        if change == "map":
            iommu.map(MIB, MIB, 20 * MIB)
            iommu.write(MIB + 5, b"y")  # through the new mapping: no log sees it
        else:
            iommu.write(MIB + 5, b"y")
            iommu.unmap(MIB, MIB)
        pages = collected(lg, memory.npages)
        first = list(range(10 * MIB // PAGE_SIZE, 11 * MIB // PAGE_SIZE))
        second = list(range(20 * MIB // PAGE_SIZE, 21 * MIB // PAGE_SIZE))
        assert pages == first + second
        assert "IOMMU mappings changed" in caplog.text
    finally:
        dev.close()
