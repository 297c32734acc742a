"""The scheduler: two busy vGPUs with weights 1:2 share the engine 1:2 (engine time, as
accounted, not wall-clock), and one vGPU alone gets the engine on demand."""

from __future__ import annotations

import time

from tests.devices.vgpu.helpers import make_vgpu, map_vram, start_ring, submit, wait_idle
from vmferry.devices.vgpu import registers as R
from vmferry.devices.vgpu.scanner import OP_FILL
from vmferry.memory import GuestMemory

COMMANDS = 2 * 4000  # more slices: the last one weighs less in the ratio
FILL = (OP_FILL, 0, 128 << 10, 0x42)  # ~tens of µs of engine time each


def test_weights_one_to_two_get_engine_time_one_to_two() -> None:
    mems = [GuestMemory(16 << 20) for _ in range(2)]
    light = make_vgpu(mems[0], "vgpu,type=vgpu-8,vram=64M")  # weight 2
    heavy = make_vgpu(mems[1], "vgpu,type=vgpu-4,vram=64M")  # weight 4
    try:
        assert (light.vtype.weight, heavy.vtype.weight) == (2, 4)
        for d in (light, heavy):
            map_vram(d, 32)
            d.mmio_write(R.CTRL, 4, 0)
            start_ring(d)
            d.mmio_write(R.CTRL, 4, 0)  # queue everything first, then start both at once
            submit(d, [FILL] * COMMANDS)
        with light.gpu.cv:
            for d in (light, heavy):
                d.mmio_write(R.CTRL, 4, 1)
        # Engine time is compared only while both have work: once one runs dry the other
        # has the engine alone (on demand), and a test thread the host delays would count
        # that solo time. So the figures are the last pair sampled, under the scheduler's
        # lock, while both were still ready.
        shared: tuple[int, int] | None = None
        while True:
            time.sleep(0.002)
            with light.gpu.cv:
                if not (light.ctx.ready() and heavy.ctx.ready()):
                    break
                shared = (light.ctx.busy_ns, heavy.ctx.busy_ns)
        assert shared is not None, "one vGPU ran dry before the first sample"
        lb, hb = shared
        assert lb >= 50_000_000, f"only {lb} ns of shared engine time: too few slices"
        ratio = hb / lb
        assert 1.8 <= ratio <= 2.2, f"engine time {lb} : {hb} ns is 1 : {ratio:.2f}, not 1 : 2"
        assert light.mmio_read(R.BUSY_NS, 8) >= lb  # reported to the guest too
        for d in (light, heavy):
            wait_idle(d)
    finally:
        for d, m in zip((light, heavy), mems, strict=True):
            d.close()
            m.close()


def test_one_busy_vgpu_gets_the_engine_on_demand() -> None:
    mems = [GuestMemory(16 << 20) for _ in range(2)]
    busy = make_vgpu(mems[0], "vgpu,type=vgpu-8,vram=64M")
    idle = make_vgpu(mems[1], "vgpu,type=vgpu-8,vram=64M")
    try:
        map_vram(busy, 32)
        start_ring(busy)
        submit(busy, [FILL] * 400)
        wait_idle(busy)
        assert busy.ctx.busy_ns > 0 and idle.ctx.busy_ns == 0
        assert busy.mmio_read(R.COMPLETED, 8) == 400
    finally:
        for d, m in zip((busy, idle), mems, strict=True):
            d.close()
            m.close()
