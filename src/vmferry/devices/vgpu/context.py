"""One vGPU's context on its parent: the register shadows, the ring, the shadow GGTT, the
fence registers, and how one command is taken, scanned, run and retired.

Every field here is the mediator's shadow of what the guest sees, so the saved state
comes from these fields, never from register reads (KEY is write-only; IRQ_STATUS and
GGTT_REFUSED clear on read). The parent's engine thread calls :meth:`run_one`; the lock
is the parent's condition variable, shared by every vGPU on that parent.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, fields

import numpy as np

from vmferry.devices.iommu import DmaFault, Iommu
from vmferry.devices.vgpu.engine import Engine
from vmferry.devices.vgpu.ggtt import KIND_SYS, Ggtt, GpuFault
from vmferry.devices.vgpu.scanner import CMD_SIZE, OP_FENCE, BadCommand, Command, scan
from vmferry.devices.vgpu.types import GGTT_ENTRIES, VgpuType
from vmferry.devices.vgpu.vram import VramShare
from vmferry.memory.guest_memory import PAGE_SHIFT

CTRL_ENABLE = 1
STATUS_BUSY, STATUS_ERROR = 1, 2
ERR_NONE, ERR_BAD_COMMAND, ERR_GPU_FAULT, ERR_RING_FAULT = 0, 1, 2, 3
MAX_RING = 4096
U32 = 0xFFFF_FFFF


@dataclass
class Registers:
    """The guest-visible register state (the shadows), as plain data."""

    ctrl: int = 0
    ring_base: int = 0
    ring_size: int = 0
    ring_tail: int = 0
    ring_head: int = 0
    error: int = 0
    error_code: int = 0
    error_addr: int = 0
    irq_status: int = 0  # clear on read
    key: int = 0  # write-only
    completed: int = 0
    fence_value: int = 0
    ggtt_index: int = 0
    ggtt_refused: int = 0  # clear on read
    ggtt_data_lo: int = 0  # low half of a GGTT entry written as two 32-bit halves
    aperture_base: int = 0

    def to_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Registers:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"registers {sorted(set(d) ^ names)} missing or unknown")
        return cls(**{k: int(v) for k, v in d.items()})


class VgpuContext:
    def __init__(
        self, name: str, vtype: VgpuType, vram: VramShare, iommu: Iommu, lock: threading.Condition
    ) -> None:
        self.name = name
        self.type = vtype
        self.vram = vram
        self.iommu = iommu
        self.engine = Engine(vram, iommu)
        self.cv = lock
        self.regs = Registers()
        self.ggtt = Ggtt(GGTT_ENTRIES, vram.size, iommu.memory)
        self.fence_regs = np.zeros(vtype.fences, dtype=np.uint64)
        self.accepting = True
        self.busy = False  # a command is between take and retire
        # Scheduler accounting: engine time used, and its weighted virtual time.
        self.busy_ns = 0
        self.vruntime = 0.0
        # Mediated tracking: RAM pages that commands wrote, known from the scanner.
        self._mediated = np.zeros(iommu.memory.npages, dtype=bool)
        self.commands_scanned = 0
        self.scan_ns = 0

    @property
    def weight(self) -> int:
        return self.type.weight

    def reset(self) -> None:
        self.regs = Registers()
        self.ggtt.reset()
        self.fence_regs[:] = 0

    # ---- the ring
    def ready(self) -> bool:
        r = self.regs
        return (
            self.accepting
            and bool(r.ctrl & CTRL_ENABLE)
            and not r.error
            and r.ring_head != r.ring_tail
            and 2 <= r.ring_size <= MAX_RING
            and r.ring_size & (r.ring_size - 1) == 0
        )

    def run_one(self) -> int | None:
        """Take, scan, run and retire the command at RING_HEAD; engine ns used, or None if
        there was nothing to run (not ready, or quiesced). Engine time is the engine
        thread's CPU time: waiting for a lock or the GIL is not work done for this vGPU."""
        t0 = time.thread_time_ns()
        self._ask_for_slot()
        with self.cv:
            if not self.ready():
                return None
            self.busy = True
            r = self.regs
            slot_addr = r.ring_base + CMD_SIZE * (r.ring_head % r.ring_size)
            key = r.key
            cmd: Command | None = None
            error, error_addr = ERR_NONE, 0
            try:
                raw = self.iommu.read(slot_addr, CMD_SIZE).tobytes()
                # Scanned under the lock: a GGTT write cannot slip between check and use.
                t_scan = time.perf_counter_ns()
                cmd = scan(raw, self.ggtt, self.type.fences)
                self.scan_ns += time.perf_counter_ns() - t_scan
                self.commands_scanned += 1
            except DmaFault:
                error, error_addr = ERR_RING_FAULT, slot_addr
            except BadCommand:
                error = ERR_BAD_COMMAND
            except GpuFault as e:
                error, error_addr = ERR_GPU_FAULT, e.gva
        if cmd is not None:
            try:
                # Its pages asked for outside the lock (a gated IOMMU in post-copy): the
                # FENCE's write under it then finds its page present.
                self.engine.request_pages(cmd)
                if cmd.opcode != OP_FENCE:
                    self.engine.run(cmd, key)
            except DmaFault:  # guest RAM unmapped under us, or never arrived: report it
                error, cmd = ERR_GPU_FAULT, None
        with self.cv:
            r = self.regs
            if cmd is not None and cmd.opcode == OP_FENCE:
                # The fence in memory, then the registers, in one hold of the lock: a
                # guest that sees the fence and reads a register waits for the lock, so
                # it sees every register of the work before it.
                try:
                    self.engine.run(cmd, key)
                except DmaFault:
                    error, cmd = ERR_GPU_FAULT, None
            if error:
                r.error, r.error_code, r.error_addr = 1, error, error_addr
            else:
                assert cmd is not None
                r.ring_head = (r.ring_head + 1) & U32
                r.completed += 1
                r.irq_status += 1
                if cmd.opcode == OP_FENCE:
                    r.fence_value = self.fence_regs[cmd.args[2]] = cmd.args[1]
                self._record_writes(cmd)
            self.busy = False
            dt = time.thread_time_ns() - t0
            self.busy_ns += dt
            self.vruntime += dt / self.weight
            self.cv.notify_all()
        return dt

    def _ask_for_slot(self) -> None:
        """A gated IOMMU (post-copy): the page of the ring slot due asked for before the
        lock every vGPU on this parent shares is taken, so the read under it does not wait
        there. Read unlocked: a stale head only asks early; a fault shows under the lock."""
        if self.iommu.page_gate is None or not self.ready():
            return
        r = self.regs
        slot_addr = r.ring_base + CMD_SIZE * (r.ring_head % max(r.ring_size, 1))
        with contextlib.suppress(DmaFault):
            self.iommu.request_pages([(slot_addr, CMD_SIZE)], "vGPU ring")

    def _record_writes(self, cmd: Command) -> None:
        # After the command ran: a sync that takes these pages sends what it wrote.
        mem = self.iommu.memory
        for gpa, n in cmd.system_writes():
            off = mem.gpa_to_offset(gpa, n)
            self._mediated[off >> PAGE_SHIFT : ((off + n - 1) >> PAGE_SHIFT) + 1] = True

    def take_mediated(self) -> np.ndarray:
        with self.cv:
            pages = np.flatnonzero(self._mediated)
            self._mediated[pages] = False
        return pages.astype(np.int64)

    def quiesce(self, accepting: bool) -> None:
        """Stop taking commands and wait for the one running (a command boundary), or go on."""
        with self.cv:
            self.accepting = accepting
            self.cv.notify_all()
            while not accepting and self.busy:
                self.cv.wait()

    # ---- the aperture: CPU access to GPU memory through the shadow GGTT
    def aperture_read(self, off: int, size: int) -> int:
        try:
            segs = self.ggtt.translate(self.regs.aperture_base + off, size)
            return int.from_bytes(self.engine.read(segs).tobytes(), "little")
        except (GpuFault, DmaFault):
            return (1 << (8 * size)) - 1  # an unmapped aperture page reads all-ones

    def aperture_write(self, off: int, size: int, value: int) -> None:
        try:
            segs = self.ggtt.translate(self.regs.aperture_base + off, size)
        except GpuFault:
            return  # dropped, as writes to an unmapped aperture page are
        data = np.frombuffer(value.to_bytes(size, "little"), dtype=np.uint8)
        self.engine.write(segs, data)
        for k, gpa, n in segs:
            if k == KIND_SYS:
                o = self.iommu.memory.gpa_to_offset(gpa, n)
                self._mediated[o >> PAGE_SHIFT : ((o + n - 1) >> PAGE_SHIFT) + 1] = True
