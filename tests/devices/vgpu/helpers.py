"""Driving a vGPU from a test, as gpujob does from a guest: GGTT, ring, doorbell, waits."""

from __future__ import annotations

import time

from vmferry.devices.base import DeviceModel
from vmferry.devices.registry import DeviceSpec, create_device
from vmferry.devices.vgpu import registers as R
from vmferry.devices.vgpu.context import STATUS_ERROR
from vmferry.devices.vgpu.device import Vgpu
from vmferry.devices.vgpu.scanner import CMD
from vmferry.memory import GuestMemory

RING = 0x100000  # guest-physical
SYS = 0x400000  # guest RAM the GGTT maps at SYS_VA
SYS_PAGES = 256
SYS_VA = 0x1000_0000
VALID, SYSTEM = 1, 2


def make_vgpu(memory: GuestMemory, spec: str = "vgpu,type=vgpu-8,vram=64M", index: int = 0) -> Vgpu:
    dev = create_device(DeviceSpec.parse(spec), index, memory)
    assert isinstance(dev, Vgpu)
    return dev


def map_vram(dev: DeviceModel, pages: int, *, at: int = 0) -> None:
    """GPU pages [at, at+pages) → VRAM pages [0, pages) of the share."""
    dev.mmio_write(R.GGTT_INDEX, 4, at)
    for i in range(pages):
        dev.mmio_write(R.GGTT_DATA, 8, (i * 4096) | VALID)


def map_system(dev: DeviceModel, gpa: int = SYS, pages: int = SYS_PAGES, va: int = SYS_VA) -> None:
    dev.mmio_write(R.GGTT_INDEX, 4, va // 4096)
    for i in range(pages):
        dev.mmio_write(R.GGTT_DATA, 8, (gpa + i * 4096) | SYSTEM | VALID)


def start_ring(dev: DeviceModel, size: int = 4096, key: int = 0) -> None:
    dev.mmio_write(R.RING_BASE, 8, RING)
    dev.mmio_write(R.RING_SIZE, 4, size)
    dev.mmio_write(R.KEY, 8, key)
    dev.mmio_write(R.CTRL, 4, 1)


def submit(dev: DeviceModel, cmds: list[tuple[int, ...]]) -> None:
    """Write commands (opcode, args…) at the ring tail and ring the doorbell."""
    mem = dev.iommu.memory
    tail = dev.mmio_read(R.RING_TAIL, 4)
    size = dev.mmio_read(R.RING_SIZE, 4)
    for c in cmds:
        op, *args = c
        raw = CMD.pack(op, 0, *args, *([0] * (7 - len(args))))
        mem.write_gpa(RING + 64 * (tail % size), raw)
        tail += 1
    dev.mmio_write(R.RING_TAIL, 4, tail & 0xFFFFFFFF)


def submit_raw(dev: DeviceModel, raws: list[bytes]) -> None:
    mem = dev.iommu.memory
    tail = dev.mmio_read(R.RING_TAIL, 4)
    size = dev.mmio_read(R.RING_SIZE, 4)
    for raw in raws:
        mem.write_gpa(RING + 64 * (tail % size), raw)
        tail += 1
    dev.mmio_write(R.RING_TAIL, 4, tail & 0xFFFFFFFF)


def wait_idle(dev: DeviceModel, timeout: float = 10.0, *, errors_ok: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while True:
        head, tail = dev.mmio_read(R.RING_HEAD, 4), dev.mmio_read(R.RING_TAIL, 4)
        status = dev.mmio_read(R.STATUS, 4)
        if status & STATUS_ERROR:
            assert errors_ok, f"the vGPU stopped with error {dev.mmio_read(R.ERROR_CODE, 4)}"
            return
        if head == tail and not status & 1:
            return
        assert time.monotonic() < deadline, f"the vGPU did not finish (head {head}, tail {tail})"
        time.sleep(0.0005)
