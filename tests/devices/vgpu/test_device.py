"""The vGPU's guest-visible behaviour and its migration hooks: shadowed write-only and
clear-on-read registers, the GGTT shadow, commands doing real work, the aperture, a pause
at a command boundary, VRAM dirty tracking for pre-copy, and mediated dirty pages."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pytest

from tests.devices.vgpu.helpers import (
    SYS,
    SYS_VA,
    make_vgpu,
    map_system,
    map_vram,
    start_ring,
    submit,
    wait_idle,
)
from vmferry.devices.fsm import MigCap, MigState
from vmferry.devices.vgpu import registers as R
from vmferry.devices.vgpu.device import Vgpu
from vmferry.devices.vgpu.engine import matmul_u32, reduce_words
from vmferry.devices.vgpu.scanner import (
    COMPUTE_MATMUL,
    COMPUTE_REDUCE,
    OP_BLIT,
    OP_COMPUTE,
    OP_COPY,
    OP_FENCE,
    OP_FILL,
)
from vmferry.memory import GuestMemory


@pytest.fixture
def dev() -> Iterator[Vgpu]:
    memory = GuestMemory(32 << 20)
    d = make_vgpu(memory)
    map_vram(d, 256)
    map_system(d)
    start_ring(d, key=0x1234)
    yield d
    d.close()
    memory.close()


def test_identity_and_discovery(dev: Vgpu) -> None:
    assert dev.mmio_read(R.ID_, 4) == R.ID
    assert dev.mmio_read(R.VRAM_SIZE, 8) == 8 << 20
    assert dev.mmio_read(R.FENCES, 4) == 4
    assert dev.identity.config == {
        "parent_model": "vmferry-gpu",
        "type": "vgpu-8",
        "vram_share": 8 << 20,
        "fences": 4,
        "ggtt_entries": 1 << 18,
    }


def test_key_is_write_only_and_irq_status_and_ggtt_refused_clear_on_read(dev: Vgpu) -> None:
    assert dev.mmio_read(R.KEY, 8) == 0
    submit(dev, [(OP_FILL, 0, 64, 1)] * 3)
    wait_idle(dev)
    assert dev.mmio_read(R.IRQ_STATUS, 4) == 3
    assert dev.mmio_read(R.IRQ_STATUS, 4) == 0
    dev.mmio_write(R.GGTT_INDEX, 4, 5000)
    dev.mmio_write(R.GGTT_DATA, 8, (64 << 20) | 1)  # beyond the 8 MiB share
    dev.mmio_write(R.GGTT_DATA, 8, (1 << 45) | 3)  # not guest RAM
    assert dev.mmio_read(R.GGTT_REFUSED, 4) == 2
    assert dev.mmio_read(R.GGTT_REFUSED, 4) == 0
    dev.mmio_write(R.GGTT_INDEX, 4, 5000)
    assert dev.mmio_read(R.GGTT_DATA, 8) == (64 << 20) | 1  # the guest's view is kept…
    assert dev.ctx.ggtt.kind[5000] == 0  # …the shadow maps nothing
    # The shadows hold what reads cannot give back.
    assert dev.ctx.regs.key == 0x1234


def test_commands_compute_for_real(dev: Vgpu) -> None:
    mem = dev.iommu.memory
    a = np.arange(64, dtype=np.uint32).reshape(8, 8) * 7919
    b = np.arange(64, dtype=np.uint32).reshape(8, 8) + 0xFFFF_0000
    mem.write_gpa(SYS, a.tobytes() + b.tobytes())
    words = np.arange(512, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    mem.write_gpa(SYS + 0x1000, words.tobytes())
    submit(
        dev,
        [
            (OP_COPY, SYS_VA + 0x1000, 0x10000, 4096),  # RAM → VRAM
            (OP_COMPUTE, COMPUTE_REDUCE, 0x10000, 512, SYS_VA + 0x2000),
            (OP_COMPUTE, COMPUTE_MATMUL, SYS_VA, SYS_VA + 256, SYS_VA + 0x3000, 8, 8, 8),
            (OP_FILL, 0x20000, 4096, 0x0102030405060708),
            (OP_BLIT, 0x20000, 0x30000, 512, 1024, 16, 4),
            (OP_COPY, 0x30000, SYS_VA + 0x4000, 4096),  # VRAM → RAM
            (OP_FENCE, SYS_VA + 0x5000, 99, 3),
        ],
    )
    wait_idle(dev)
    (red,) = struct.unpack("<Q", mem.read_gpa(SYS + 0x2000, 8))
    assert red == reduce_words(words, 0x1234)
    c = np.frombuffer(mem.read_gpa(SYS + 0x3000, 256), dtype=np.uint32).reshape(8, 8)
    want = (a.astype(np.uint64) @ b.astype(np.uint64) + 0x1234) % 2**32
    assert (c == want).all() and (c == matmul_u32(a, b, 0x1234)).all()
    surf = np.frombuffer(mem.read_gpa(SYS + 0x4000, 4096), dtype=np.uint8).reshape(4, 1024)
    pattern = np.frombuffer(struct.pack("<Q", 0x0102030405060708) * 2, np.uint8)
    assert (surf[:, :16] == pattern).all()
    assert (surf[:, 16:] == 0).all()
    assert mem.read_gpa(SYS + 0x5000, 8) == struct.pack("<Q", 99)
    assert dev.mmio_read(R.FENCE_REG + 24, 8) == 99
    assert dev.mmio_read(R.FENCE_VALUE, 8) == 99


def test_the_aperture_reaches_gpu_memory_through_the_ggtt(dev: Vgpu) -> None:
    dev.mmio_write(R.APERTURE_BASE, 8, 0x5000)
    dev.mmio_write(R.APERTURE + 8, 8, 0xDEADBEEF_CAFEF00D)
    assert dev.vram.bytes[0x5008:0x5010].tobytes() == struct.pack("<Q", 0xDEADBEEF_CAFEF00D)
    assert dev.mmio_read(R.APERTURE + 8, 8) == 0xDEADBEEF_CAFEF00D
    dev.mmio_write(R.APERTURE_BASE, 8, 0x900000)  # unmapped: reads all-ones
    assert dev.mmio_read(R.APERTURE, 4) == 0xFFFFFFFF


def test_a_pause_stops_at_a_command_boundary_and_nothing_runs_after(dev: Vgpu) -> None:
    submit(dev, [(OP_FILL, 0, 1 << 20, i) for i in range(256)])
    dev.set_state(MigState.RUNNING_P2P)
    assert not dev.ctx.busy, "RUNNING_P2P returned with a command on the engine"
    head = dev.mmio_read(R.RING_HEAD, 4)
    assert head < 256, "the work finished before the pause: nothing was in flight"
    vram = dev.vram.bytes[:16].copy()
    dev.set_state(MigState.STOP)
    assert dev.mmio_read(R.RING_HEAD, 4) == head and (dev.vram.bytes[:16] == vram).all()
    dev.set_state(MigState.RUNNING)
    wait_idle(dev)
    assert dev.mmio_read(R.COMPLETED, 8) == 256


def test_vram_the_engine_writes_during_pre_copy_is_sent_again(dev: Vgpu) -> None:
    dev.set_state(MigState.PRE_COPY)
    while dev.read_data(64 << 20):
        pass
    assert dev.precopy_info() == (0, 0)
    submit(dev, [(OP_FILL, 0x3000, 0x2000, 5), (OP_COPY, 0x3000, 0x7FF8, 16)])
    wait_idle(dev)
    assert dev.vram.dirty_count() == 4  # pages 3, 4, 7, 8
    assert dev.precopy_info()[1] == 4 + 4 * (4096 + 4)
    piece = dev.read_data(1 << 20)
    assert piece is not None and len(piece) == 8 + 4 + 4 * (4096 + 4) + 4
    assert dev.precopy_info() == (0, 0)
    dev.set_state(MigState.RUNNING)


def test_mediated_tracking_reports_exactly_the_ram_pages_commands_wrote() -> None:
    memory = GuestMemory(32 << 20)
    d = make_vgpu(memory, "vgpu,type=vgpu-8,vram=64M,dirty=mediated")
    try:
        map_vram(d, 16)
        map_system(d)
        start_ring(d)
        submit(
            d,
            [
                (OP_COPY, 0, SYS_VA + 0x1FF8, 16),  # straddles two RAM pages
                (OP_COPY, SYS_VA + 0x8000, 0, 4096),  # reads RAM: not a write
                (OP_BLIT, 0, SYS_VA + 0x10000, 4096, 8192, 8, 3),  # rows 8 KiB apart
                (OP_FENCE, SYS_VA + 0x30000, 1, 0),
            ],
        )
        wait_idle(d)
        first = SYS // 4096
        got = d.mediated_dirty_pages().tolist()
        assert got == [first + p for p in (1, 2, 0x10, 0x12, 0x14, 0x30)]
        assert d.mediated_dirty_pages().size == 0, "not cleared when reported"
    finally:
        d.close()
        memory.close()


def test_precopy_off_is_the_same_device_without_pre_copy() -> None:
    memory = GuestMemory(32 << 20)
    d = make_vgpu(memory, "vgpu,type=vgpu-8,vram=64M,precopy=off")
    try:
        assert MigCap.PRE_COPY not in d.caps and MigCap.P2P in d.caps
        assert d.stop_copy_size() > 8 << 20  # all of VRAM moves in the downtime
    finally:
        d.close()
        memory.close()
