"""A VM: guest memory, vCPU threads, the I/O bus, boot, pause/resume, state capture/restore."""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vmferry.devices.base import DeviceModel
from vmferry.devices.registry import create_devices, mmio_base
from vmferry.errors import MachineStateError, VmferryError
from vmferry.kvm.system import DEFAULT_DEVICE, Kvm
from vmferry.kvm.vcpu import VcpuHandle
from vmferry.kvm.vm import VmHandle
from vmferry.machine import boot
from vmferry.machine.config import MachineConfig
from vmferry.machine.cpuid import guest_cpuid
from vmferry.machine.images import resolve_image
from vmferry.machine.mmio import MmioBus
from vmferry.machine.multiboot import load_image, write_boot_info
from vmferry.machine.ports import (
    COM1_BASE,
    DEBUG_EXIT_PORT,
    HALT_PORT,
    DebugExit,
    HaltPort,
    IoBus,
    SerialConsole,
)
from vmferry.machine.state import MachineState, VcpuState, apply_vcpu, capture_vcpu
from vmferry.machine.vcpu_thread import VcpuRunState, VcpuThread, install_kick_handler
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SHIFT, GuestMemory

THROTTLE_TIMESLICE_S = 0.010  # QEMU's CPU_THROTTLE_TIMESLICE: 10 ms of run per period


@dataclass(frozen=True)
class GuestExit:
    """How a run ended: the guest wrote ``code`` to the debug-exit port, or it faulted."""

    code: int | None
    error: VmferryError | None = None

    @property
    def qemu_status(self) -> int | None:
        """The exit status QEMU's isa-debug-exit would give for the same write."""
        return None if self.code is None else (self.code << 1) | 1


class Machine:
    """One VM. Build with :meth:`boot` or :meth:`from_state`; then start/pause/resume/close."""

    def __init__(
        self,
        config: MachineConfig,
        *,
        kvm_device: str = DEFAULT_DEVICE,
        serial: BinaryIO | None = None,
        memory: GuestMemory | None = None,
        devices: list[DeviceModel] | None = None,
    ) -> None:
        """``devices``: already built (a migration destination builds them at set-up, to
        check them and feed them their state before the machine exists)."""
        install_kick_handler()
        self.config = config
        self.kvm = Kvm(kvm_device)
        self._closed = False
        try:
            self.vm = VmHandle(self.kvm)
            self.memory = memory or GuestMemory(config.memory)
            self.dirty_logging = False
            self._register_memory(log_dirty=False)
            self.serial = SerialConsole(serial or sys.stdout.buffer)
            self.bus = IoBus()
            self.bus.register(COM1_BASE, 8, self.serial)
            self.bus.register(DEBUG_EXIT_PORT, 4, DebugExit(self._guest_exit))
            self.bus.register(HALT_PORT, 4, HaltPort(self._park))
            self.msr_indices = self.kvm.msr_index_list()
            self.handles = [VcpuHandle(self.vm, i) for i in range(config.vcpus)]
            self.tsc_khz = self.handles[0].tsc_khz()
            supported = self.kvm.supported_cpuid()
            for h in self.handles:
                h.set_cpuid(guest_cpuid(supported, h.index, config.vcpus, self.tsc_khz))
            self.mmio = MmioBus()
            self.devices: list[DeviceModel] = (
                devices if devices is not None else create_devices(config, self.memory)
            )
            for i, dev in enumerate(self.devices):
                self.mmio.register(mmio_base(i), dev.mmio_size, dev)
            self.vcpus = [
                VcpuThread(h, self.bus, self.mmio, self._vcpu_fault) for h in self.handles
            ]
        except BaseException:
            self.close()
            raise
        self.throttle_pct = 0
        self._throttle_lock = threading.Lock()
        self._throttle_stop = threading.Event()
        self._throttle_thread: threading.Thread | None = None
        self._exit_lock = threading.Lock()
        self._exited = threading.Event()
        self._exit: GuestExit | None = None
        self.started = False

    # ---- construction
    @classmethod
    def boot(cls, config: MachineConfig, **kw: object) -> Machine:
        m = cls(config, **kw)  # type: ignore[arg-type]
        try:
            image = load_image(resolve_image(config.image), m.memory)
            mbi = write_boot_info(m.memory, config.cmdline)
            for h in m.handles:
                sregs = h.get_sregs()
                boot.boot_sregs(sregs)
                h.set_sregs(sregs)
                h.set_regs(boot.boot_regs(h.index, image.entry, mbi))
        except BaseException:
            m.close()
            raise
        return m

    @classmethod
    def from_state(cls, state: MachineState, memory: GuestMemory, **kw: object) -> Machine:
        """A machine around already-loaded RAM, with every vCPU put back as saved."""
        m = cls(state.config, memory=memory, **kw)  # type: ignore[arg-type]
        try:
            m.restore_cpu_state(state)
        except BaseException:
            m.close()
            raise
        return m

    def _register_memory(self, *, log_dirty: bool) -> None:
        for slot, r in enumerate(self.memory.regions):
            self.vm.set_memory_region(
                slot, r.gpa, r.size, self.memory.host_addr + r.ram_offset, log_dirty=log_dirty
            )

    # ---- running
    def start(self, *, paused: bool = False) -> None:
        if self.started:
            raise MachineStateError("machine already started")
        self.started = True
        for v in self.vcpus:
            v.start(running=not paused)

    def pause(self) -> float:
        """Stop every vCPU at a consistent point; returns how long that took (seconds)."""
        t0 = time.perf_counter()
        self._request_all(VcpuRunState.PAUSED)
        return time.perf_counter() - t0

    def resume(self) -> None:
        self._request_all(VcpuRunState.RUNNING)

    def _request_all(self, want: VcpuRunState) -> None:
        if not self.started:
            raise MachineStateError("machine not started")
        for v in self.vcpus:
            v.request(want)
        # Resume waits too: when it returns the VM runs (a rollback reports "running").
        for v in self.vcpus:
            v.wait_settled()

    @property
    def running(self) -> bool:
        """Started and not asked to pause or stop: what a user means by 'running'."""
        return self.started and all(v.requested is VcpuRunState.RUNNING for v in self.vcpus)

    @property
    def paused(self) -> bool:
        """No vCPU is in the guest: paused, or not started yet."""
        return all(v.state in (VcpuRunState.PAUSED, VcpuRunState.CREATED) for v in self.vcpus)

    def wait(self, timeout: float | None = None) -> GuestExit | None:
        """Wait for the guest to end (debug exit or fault); None on timeout."""
        if not self._exited.wait(timeout):
            return None
        return self._exit

    @property
    def exit(self) -> GuestExit | None:
        return self._exit

    def _finish(self, result: GuestExit) -> None:
        with self._exit_lock:
            if self._exit is not None:
                return
            self._exit = result
        for v in self.vcpus:
            v.request(VcpuRunState.STOPPED)
        self._exited.set()

    def _guest_exit(self, value: int, vcpu: int) -> None:
        self._finish(GuestExit(code=value))

    def _vcpu_fault(self, index: int, err: VmferryError) -> None:
        self._finish(GuestExit(code=None, error=err))

    def _park(self, vcpu: int, max_us: int) -> None:
        self.vcpus[vcpu].park(max_us)

    # ---- dirty logging
    def set_dirty_logging(self, on: bool) -> None:
        """Turn KVM's dirty log on (every page write-protected now) or off."""
        if on != self.dirty_logging:
            self._register_memory(log_dirty=on)
            self.dirty_logging = on

    def fetch_dirty_log(self, into: DirtyBitmap) -> None:
        """OR the pages the vCPUs dirtied since they were last cleared into ``into``."""
        if not self.dirty_logging:
            raise MachineStateError("dirty logging is off")
        for slot, r in enumerate(self.memory.regions):
            npages = r.size >> PAGE_SHIFT
            words = np.zeros((npages + 63) // 64, dtype=np.uint64)
            self.vm.get_dirty_log(slot, words)
            first = r.ram_offset >> PAGE_SHIFT  # region offsets are 64-page aligned
            np.bitwise_or(
                into.words[first // 64 : first // 64 + words.size],
                words,
                out=into.words[first // 64 : first // 64 + words.size],
            )

    def clear_dirty_log(self, pages: DirtyBitmap, first: int = 0, count: int | None = None) -> None:
        """Re-protect the pages set in ``pages`` within RAM pages [first, first+count): the
        words are handed to KVM_CLEAR_DIRTY_LOG as they are (a view, no copy), one call per
        memory slot the range touches."""
        if count is None:
            count = self.memory.npages - first
        if first % 64:
            raise ValueError(f"clear range must start on a 64-page boundary, not page {first}")
        for slot, r in enumerate(self.memory.regions):
            rfirst, rcount = r.ram_offset >> PAGE_SHIFT, r.size >> PAGE_SHIFT
            lo, hi = max(first, rfirst), min(first + count, rfirst + rcount)
            if lo >= hi:
                continue
            n = hi - lo
            if n % 64 and hi != rfirst + rcount:
                n -= n % 64  # KVM takes whole words except at the slot's end
                if n == 0:
                    continue
            words = np.ascontiguousarray(pages.words[lo // 64 : (lo + n + 63) // 64])
            self.vm.clear_dirty_log(slot, lo - rfirst, words, n)

    # ---- throttling (auto-converge)
    def set_throttle(self, pct: int) -> None:
        """Keep vCPUs out of the guest ``pct`` % of the time, as QEMU's cpu-throttle does."""
        pct = max(0, min(99, pct))
        self.throttle_pct = pct
        with self._throttle_lock:
            if pct and self._throttle_thread is None:
                self._throttle_stop.clear()
                self._throttle_thread = threading.Thread(
                    target=self._throttle_loop, name="cpu-throttle", daemon=True
                )
                self._throttle_thread.start()
            elif not pct and self._throttle_thread is not None:
                self._throttle_stop.set()
                self._throttle_thread.join()
                self._throttle_thread = None

    def _throttle_loop(self) -> None:
        while not self._throttle_stop.is_set():
            pct = self.throttle_pct
            sleep = THROTTLE_TIMESLICE_S * pct / (100 - pct)
            for v in self.vcpus:
                v.throttle(sleep)
            self._throttle_stop.wait(THROTTLE_TIMESLICE_S + sleep)

    # ---- state
    def save_state(self) -> MachineState:
        if not self.paused:
            raise MachineStateError("machine state can only be captured while paused")
        vcpus: list[VcpuState] = [
            v.call(lambda h: capture_vcpu(h, self.msr_indices)) for v in self.vcpus
        ]
        return MachineState(config=self.config, clock=self.vm.get_clock(), vcpus=vcpus)

    def restore_cpu_state(self, state: MachineState) -> None:
        if len(state.vcpus) != len(self.vcpus):
            raise MachineStateError(
                f"state has {len(state.vcpus)} vCPUs, machine has {len(self.vcpus)}"
            )
        self.vm.set_clock(state.clock)
        for v, st in zip(self.vcpus, state.vcpus, strict=True):
            v.call(functools.partial(_apply_on, st=st))

    # ---- teardown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_throttle_thread", None) is not None:
            self.set_throttle(0)
        for v in getattr(self, "vcpus", []):
            with contextlib.suppress(MachineStateError):
                v.request(VcpuRunState.STOPPED)
        for v in getattr(self, "vcpus", []):
            v.join(5.0)
        for dev in getattr(self, "devices", []):
            dev.close()
        for h in getattr(self, "handles", []):
            h.close()
        if hasattr(self, "vm"):
            self.vm.close()
        if hasattr(self, "memory"):
            self.memory.close()
        self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _apply_on(handle: VcpuHandle, st: VcpuState) -> None:
    apply_vcpu(handle, st)


def run_to_exit(machine: Machine, timeout: float | None = None) -> GuestExit:
    machine.start()
    result = machine.wait(timeout)
    if result is None:
        raise VmferryError(f"guest did not finish within {timeout} s")
    return result


__all__ = ["GuestExit", "Machine", "Path", "run_to_exit"]
