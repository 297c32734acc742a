"""The device conformance kit, run against the vGPU (with and without VRAM pre-copy)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.devices.vgpu.helpers import (
    SYS_VA,
    make_vgpu,
    map_system,
    map_vram,
    start_ring,
    submit,
    wait_idle,
)
from vmferry.devices.base import DeviceModel
from vmferry.devices.iommu import DirtyTracking
from vmferry.devices.vgpu.device import Vgpu
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
from vmferry.testing import conformance

VRAM_PAGES = 64


def maker(precopy: str) -> Any:
    def make(memory: GuestMemory, mode: DirtyTracking) -> DeviceModel:
        return make_vgpu(memory, f"vgpu,type=vgpu-4,vram=16M,precopy={precopy},dirty={mode.value}")

    return make


def exercise(dev: DeviceModel, rnd: int) -> None:
    if rnd == 0:
        map_vram(dev, VRAM_PAGES)
        map_system(dev)
        start_ring(dev, key=0x5EED)
    v = 0x0101010101010101 * (rnd + 1)
    submit(
        dev,
        [
            (OP_FILL, 0x4000 * rnd, 0x8000, v),
            (OP_COPY, 0, 0x20000 + 0x1000 * rnd, 0x3000),
            (OP_BLIT, 0x100, 0x30000, 256, 512, 64, 16),
            (OP_COPY, 0x8000, SYS_VA + 0x2000, 0x1000),  # VRAM → RAM
            (OP_COMPUTE, COMPUTE_REDUCE, 0, 512, SYS_VA + 0x3000),
            (OP_COMPUTE, COMPUTE_MATMUL, 0, 0x1000, 0x38000, 8, 8, 8),
            (OP_FENCE, SYS_VA, 100 + rnd, rnd % 8),
        ],
    )
    wait_idle(dev)


def fingerprint(dev: DeviceModel) -> Any:
    assert isinstance(dev, Vgpu)
    ctx = dev.ctx
    idx, val = ctx.ggtt.programmed()
    return (
        ctx.regs.to_dict(),
        ctx.fence_regs.tolist(),
        idx.tolist(),
        val.tolist(),
        ctx.busy_ns,
        hashlib.sha256(dev.vram.bytes.tobytes()).hexdigest(),
    )


@pytest.mark.parametrize("precopy", ["on", "off"])
@pytest.mark.parametrize("check", conformance.ALL_CHECKS, ids=lambda c: c.__name__)
def test_conformance(check: Any, precopy: str) -> None:
    check(
        conformance.DeviceUnderTest(make=maker(precopy), exercise=exercise, fingerprint=fingerprint)
    )
