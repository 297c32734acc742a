"""The physical GPU (the mdev parent) in this process: its VRAM, its engine thread, and
the scheduler that shares the engine between the vGPUs on it.

Scheduling is weighted fair queueing in ≈1 ms time slices: the engine runs the vGPU
with work whose virtual time (engine ns used ÷ weight) is least, for a slice, one whole
command at a time; when only one vGPU has work it keeps the engine (on-demand), and a
vGPU that was idle comes back at most one slice behind the others, so it cannot hoard
the engine. Engine time is what is accounted, so fairness does not depend on wall-clock
luck. vmferry runs one VM per process, so vGPUs share a parent's engine when they are in
one process (tests, benchmarks); the host registry (mdev.py) shares the VRAM accounting.
"""

from __future__ import annotations

import threading
import time

from vmferry.devices.vgpu.context import VgpuContext
from vmferry.devices.vgpu.vram import ParentVram

SLICE_NS = 1_000_000

_parents: dict[str, PhysicalGpu] = {}
_parents_lock = threading.Lock()


class PhysicalGpu:
    def __init__(self, name: str, vram_size: int) -> None:
        self.name = name
        self.vram = ParentVram(vram_size, name)
        self.cv = threading.Condition(threading.RLock())
        self.contexts: list[VgpuContext] = []
        self.min_vruntime = 0.0
        self.slices = 0
        self._alive = True
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()

    # ---- which parent, in this process
    @classmethod
    def get(cls, name: str, vram_size: int) -> PhysicalGpu:
        with _parents_lock:
            gpu = _parents.get(name)
            if gpu is None or gpu.vram.size != vram_size:
                if gpu is not None and gpu.contexts:
                    raise RuntimeError(f"parent {name} is in use with another VRAM size")
                gpu = _parents[name] = cls(name, vram_size)
            return gpu

    def attach(self, ctx: VgpuContext) -> None:
        with self.cv:
            ctx.vruntime = self.min_vruntime
            self.contexts.append(ctx)
            self.cv.notify_all()

    def detach(self, ctx: VgpuContext) -> None:
        ctx.quiesce(False)
        with self.cv:
            self.contexts.remove(ctx)
            empty = not self.contexts
        if empty:
            with _parents_lock:
                if _parents.get(self.name) is self and not self.contexts:
                    del _parents[self.name]
                    self._stop()

    def _stop(self) -> None:
        with self.cv:
            self._alive = False
            self.cv.notify_all()
        self._thread.join(5)
        self.vram.close()

    # ---- the scheduler
    def _pick(self) -> VgpuContext | None:
        ready = [c for c in self.contexts if c.ready()]
        if not ready:
            return None
        floor = self.min_vruntime - SLICE_NS / min(c.weight for c in ready)
        for c in ready:
            c.vruntime = max(c.vruntime, floor)  # idle time is not credit
        pick = min(ready, key=lambda c: c.vruntime)
        self.min_vruntime = max(self.min_vruntime, pick.vruntime)
        return pick

    def _others_ready(self, ctx: VgpuContext) -> bool:
        with self.cv:
            return any(c is not ctx and c.ready() for c in self.contexts)

    def _loop(self) -> None:
        while True:
            with self.cv:
                while self._alive and (ctx := self._pick()) is None:
                    self.cv.wait()
                if not self._alive:
                    return
                assert ctx is not None
                self.slices += 1
            used = 0
            while True:
                dt = ctx.run_one()
                if dt is None:
                    break
                used += dt
                if used >= SLICE_NS:
                    if self._others_ready(ctx):
                        break
                    used = 0  # alone with work: on-demand, keep the engine
            time.sleep(0)  # let MMIO handlers in between slices
