"""dmaengine: its registers and DMA, in-flight work at a pause, and the conformance kit."""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np
import pytest

from vmferry.devices import dmaengine as de
from vmferry.devices.base import DeviceModel
from vmferry.devices.fsm import MigState
from vmferry.devices.iommu import DirtyTracking
from vmferry.devices.registry import DeviceSpec, create_device
from vmferry.memory import DirtyBitmap, GuestMemory
from vmferry.testing import conformance

RING, COMP, BUF = 0x100000, 0x180000, 0x200000


def make(memory: GuestMemory, mode: DirtyTracking) -> DeviceModel:
    return create_device(DeviceSpec.parse(f"dmaengine,dirty={mode.value}"), 0, memory)


def program(dev: DeviceModel, ring_size: int = 64, key: int = 0xABCDEF) -> None:
    dev.mmio_write(de.REG_KEY, 8, key)
    dev.mmio_write(de.REG_RING_BASE, 8, RING)
    dev.mmio_write(de.REG_RING_SIZE, 4, ring_size)
    dev.mmio_write(de.REG_CTRL, 4, de.CTRL_ENABLE)


def submit(dev: DeviceModel, descs: list[bytes]) -> None:
    tail = dev.mmio_read(de.REG_RING_TAIL, 4)
    size = dev.mmio_read(de.REG_RING_SIZE, 4)
    for d in descs:
        dev.iommu.memory.write_gpa(RING + 64 * (tail % size), d)
        tail += 1
    dev.mmio_write(de.REG_RING_TAIL, 4, tail)


def wait_idle(dev: DeviceModel, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while dev.mmio_read(de.REG_RING_HEAD, 4) != dev.mmio_read(de.REG_RING_TAIL, 4):
        assert time.monotonic() < deadline, "device did not finish"
        assert not dev.mmio_read(de.REG_STATUS, 4) & de.STATUS_ERROR
        time.sleep(0.001)


def exercise(dev: DeviceModel, rnd: int) -> None:
    if rnd == 0:
        program(dev)
    mem = dev.iommu.memory
    mem.bytes[BUF : BUF + 65536] = np.arange(65536, dtype=np.uint8) ^ rnd
    ops = [de.OP_COPY, de.OP_FILL, de.OP_CHECKSUM]
    submit(
        dev,
        [
            de.DESC.pack(
                ops[i % 3],
                0,
                BUF,
                BUF + 0x10000 * (1 + i % 4),
                4096,
                i + rnd,
                COMP + 16 * i,
                100 * rnd + i,
                0,
            )
            for i in range(12)
        ],
    )
    wait_idle(dev)


def fingerprint(dev: DeviceModel) -> Any:
    assert isinstance(dev, de.DmaEngine)
    return dev._registers(), dev.table.tobytes()


DUT = conformance.DeviceUnderTest(make=make, exercise=exercise, fingerprint=fingerprint)


@pytest.mark.parametrize("check", conformance.ALL_CHECKS, ids=lambda c: c.__name__)
def test_conformance(check: Any) -> None:
    check(DUT)


@pytest.fixture
def dev() -> Any:
    memory = GuestMemory(64 << 20)
    d = make(memory, DirtyTracking.IOMMU)
    yield d
    d.close()
    memory.close()


def test_commands_do_real_dma_and_complete(dev: DeviceModel) -> None:
    mem = dev.iommu.memory
    program(dev)
    mem.bytes[BUF : BUF + 4096] = np.arange(4096, dtype=np.uint8)
    submit(
        dev,
        [
            de.DESC.pack(de.OP_COPY, 0, BUF, BUF + 8192, 4096, 0, COMP, 1, 0),
            de.DESC.pack(de.OP_FILL, 0, 0, BUF + 16384, 64, 0x0102030405060708, COMP + 16, 2, 0),
            de.DESC.pack(de.OP_CHECKSUM, 0, BUF, 0, 4096, 77, COMP + 32, 3, 0),
        ],
    )
    wait_idle(dev)
    assert mem.read_gpa(BUF + 8192, 4096) == mem.read_gpa(BUF, 4096)
    assert mem.read_gpa(BUF + 16384, 8) == struct.pack("<Q", 0x0102030405060708)
    words = np.frombuffer(mem.read_gpa(BUF, 4096), dtype=np.uint64)
    expect = (int(sum(int(w) * (2 * i + 1) for i, w in enumerate(words))) + 77) % 2**64
    assert struct.unpack("<QQ", mem.read_gpa(COMP + 32, 16)) == (3, expect ^ 0xABCDEF)


def test_key_is_write_only_and_irq_status_clears_on_read(dev: DeviceModel) -> None:
    program(dev, key=0x1234)
    assert dev.mmio_read(de.REG_KEY, 8) == 0
    submit(dev, [de.DESC.pack(de.OP_FILL, 0, 0, BUF, 8, 1, COMP, 9, 0)] * 3)
    wait_idle(dev)
    assert dev.mmio_read(de.REG_IRQ_STATUS, 4) == 3
    assert dev.mmio_read(de.REG_IRQ_STATUS, 4) == 0
    # …yet both survive a migration, from the shadows.
    assert isinstance(dev, de.DmaEngine)
    assert dev._registers()["key"] == 0x1234


def test_bad_descriptor_and_unmapped_address_stop_with_an_error(dev: DeviceModel) -> None:
    program(dev)
    submit(dev, [de.DESC.pack(9, 0, 0, 0, 8, 0, COMP, 1, 0)])
    time.sleep(0.05)
    assert dev.mmio_read(de.REG_STATUS, 4) & de.STATUS_ERROR
    assert dev.mmio_read(de.REG_ERROR_CODE, 4) == de.ERR_BAD_DESC
    dev.mmio_write(de.REG_CTRL, 4, 0)
    dev.mmio_write(de.REG_CTRL, 4, de.CTRL_ENABLE)  # clears the error, skips it
    submit(dev, [de.DESC.pack(de.OP_FILL, 0, 0, 0xE0000000, 8, 0, COMP, 2, 0)])
    time.sleep(0.05)
    assert dev.mmio_read(de.REG_ERROR_CODE, 4) == de.ERR_DMA_FAULT


def test_quiescing_waits_for_the_descriptor_in_flight(dev: DeviceModel) -> None:
    program(dev)
    big = 16 << 20
    submit(
        dev,
        [
            de.DESC.pack(de.OP_CHECKSUM, 0, 0x1000000, 0, big, 0, COMP + 16 * i, i, 0)
            for i in range(8)
        ],
    )
    time.sleep(0.002)
    dev.set_state(MigState.RUNNING_P2P)
    assert isinstance(dev, de.DmaEngine)
    assert not dev._busy, "RUNNING_P2P returned with a descriptor in flight"
    head = dev.mmio_read(de.REG_RING_HEAD, 4)
    time.sleep(0.05)
    assert dev.mmio_read(de.REG_RING_HEAD, 4) == head, "work started while quiesced"
    assert head < 8
    dev.set_state(MigState.RUNNING)
    wait_idle(dev)


def test_iommu_mode_records_every_page_dma_writes(dev: DeviceModel) -> None:
    dev.iommu.set_dirty_tracking(True)
    program(dev)
    submit(dev, [de.DESC.pack(de.OP_FILL, 0, 0, BUF + 4088, 16, 1, COMP, 1, 0)])
    wait_idle(dev)
    got = DirtyBitmap(dev.iommu.memory.npages)
    dev.iommu.read_and_clear_dirty(got)
    pages = set(got.pages().tolist())
    assert pages == {BUF // 4096, BUF // 4096 + 1, COMP // 4096}
    again = DirtyBitmap(dev.iommu.memory.npages)
    dev.iommu.read_and_clear_dirty(again)
    assert again.count() == 0
