"""A KVM vCPU handle: the shared kvm_run page, KVM_RUN, and every piece of register state."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any

from vmferry.errors import KvmError
from vmferry.kvm import uapi
from vmferry.kvm.ioctl import ioctl, ioctl_raw
from vmferry.kvm.system import CpuidEntry
from vmferry.kvm.vm import VmHandle


@dataclass(frozen=True)
class RunResult:
    """What one KVM_RUN ended with: an exit reason, or ``interrupted`` (EINTR)."""

    interrupted: bool
    exit_reason: int


class VcpuHandle:
    """One vCPU. Owns its fd and its kvm_run mapping."""

    def __init__(self, vm: VmHandle, index: int) -> None:
        self.index = index
        self.fd = vm.create_vcpu_fd(index)
        self._xsave_size = vm.kvm.xsave_size()
        self._has_xsave2 = vm.kvm.check_extension(uapi.KVM_CAP_XSAVE2) > 0
        try:
            self._run_map = mmap.mmap(
                self.fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self.fd)
            raise
        self.run_page: uapi.KvmRunHeader | None = uapi.KvmRunHeader.from_buffer(self._run_map)

    @property
    def run_state(self) -> uapi.KvmRunHeader:
        assert self.run_page is not None, "vCPU handle is closed"
        return self.run_page

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page = None
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1

    # ---- running
    def run(self) -> RunResult:
        """One KVM_RUN. Blocks (GIL released) until an exit or a signal."""
        ret, err = ioctl_raw(self.fd, uapi.KVM_RUN, 0)
        if ret < 0:
            if err in (errno.EINTR, errno.EAGAIN):
                return RunResult(True, uapi.KVM_EXIT_INTR)
            raise KvmError(f"KVM_RUN(vCPU {self.index})", err)
        return RunResult(False, self.run_state.exit_reason)

    def io_data(self, offset: int, length: int) -> memoryview:
        """The data area of an I/O exit, inside the shared kvm_run page."""
        return memoryview(self._run_map)[offset : offset + length]

    def set_immediate_exit(self, on: bool) -> None:
        self.run_state.immediate_exit = 1 if on else 0

    # ---- registers
    def get_regs(self) -> uapi.KvmRegs:
        regs = uapi.KvmRegs()
        ioctl(self.fd, uapi.KVM_GET_REGS, regs, what="KVM_GET_REGS")
        return regs

    def set_regs(self, regs: uapi.KvmRegs) -> None:
        ioctl(self.fd, uapi.KVM_SET_REGS, regs, what="KVM_SET_REGS")

    def get_sregs(self) -> uapi.KvmSregs:
        sregs = uapi.KvmSregs()
        ioctl(self.fd, uapi.KVM_GET_SREGS, sregs, what="KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: uapi.KvmSregs) -> None:
        ioctl(self.fd, uapi.KVM_SET_SREGS, sregs, what="KVM_SET_SREGS")

    def _get_blob(self, request: int, size: int, what: str) -> bytes:
        buf = ctypes.create_string_buffer(size)
        ioctl(self.fd, request, ctypes.addressof(buf), what=what)
        return buf.raw

    def _set_blob(self, request: int, raw: bytes, size: int, what: str) -> None:
        if len(raw) != size:
            raise KvmError(what, errno.EINVAL, f"state blob is {len(raw)} bytes, want {size}")
        # A mutable copy: KVM reads it through a pointer (fcntl.ioctl would cap it at 1 KiB).
        buf = ctypes.create_string_buffer(raw, size)
        ioctl(self.fd, request, ctypes.addressof(buf), what=what)

    def get_xsave(self) -> bytes:
        if self._has_xsave2:
            return self._get_blob(uapi.KVM_GET_XSAVE2, self._xsave_size, "KVM_GET_XSAVE2")
        return self._get_blob(uapi.KVM_GET_XSAVE, uapi.SIZEOF_XSAVE, "KVM_GET_XSAVE")

    def set_xsave(self, raw: bytes) -> None:
        # KVM_SET_XSAVE takes the larger KVM_GET_XSAVE2 layout when KVM_CAP_XSAVE2 is on.
        self._set_blob(uapi.KVM_SET_XSAVE, raw, len(raw), "KVM_SET_XSAVE")

    def get_xcrs(self) -> bytes:
        return self._get_blob(uapi.KVM_GET_XCRS, uapi.SIZEOF_XCRS, "KVM_GET_XCRS")

    def set_xcrs(self, raw: bytes) -> None:
        self._set_blob(uapi.KVM_SET_XCRS, raw, uapi.SIZEOF_XCRS, "KVM_SET_XCRS")

    def get_vcpu_events(self) -> bytes:
        return self._get_blob(
            uapi.KVM_GET_VCPU_EVENTS, uapi.SIZEOF_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS"
        )

    def set_vcpu_events(self, raw: bytes) -> None:
        self._set_blob(
            uapi.KVM_SET_VCPU_EVENTS, raw, uapi.SIZEOF_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS"
        )

    def get_debugregs(self) -> bytes:
        return self._get_blob(uapi.KVM_GET_DEBUGREGS, uapi.SIZEOF_DEBUGREGS, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, raw: bytes) -> None:
        self._set_blob(uapi.KVM_SET_DEBUGREGS, raw, uapi.SIZEOF_DEBUGREGS, "KVM_SET_DEBUGREGS")

    def get_mp_state(self) -> int:
        v = ctypes.c_uint32()
        ioctl(self.fd, uapi.KVM_GET_MP_STATE, v, what="KVM_GET_MP_STATE")
        return v.value

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, uapi.KVM_SET_MP_STATE, ctypes.c_uint32(state), what="KVM_SET_MP_STATE")

    def tsc_khz(self) -> int:
        return ioctl(self.fd, uapi.KVM_GET_TSC_KHZ, 0, what="KVM_GET_TSC_KHZ")

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        n = len(entries)

        class Cpuid2(ctypes.Structure):
            _fields_ = [
                ("nent", ctypes.c_uint32),
                ("padding", ctypes.c_uint32),
                ("entries", uapi.KvmCpuidEntry2 * n),
            ]

        buf = Cpuid2(nent=n)
        for i, e in enumerate(entries):
            buf.entries[i] = uapi.KvmCpuidEntry2(
                e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx
            )
        ioctl(self.fd, uapi.KVM_SET_CPUID2, buf, what="KVM_SET_CPUID2")

    def _msr_buffer(self, pairs: list[tuple[int, int]]) -> Any:
        n = len(pairs)

        class Msrs(ctypes.Structure):
            _fields_ = [
                ("nmsrs", ctypes.c_uint32),
                ("pad", ctypes.c_uint32),
                ("entries", uapi.KvmMsrEntry * n),
            ]

        buf = Msrs(nmsrs=n)
        for i, (index, data) in enumerate(pairs):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return buf

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; KVM stops at the first it cannot read, so skip that one and go on."""
        out: dict[int, int] = {}
        rest = list(indices)
        while rest:
            buf = self._msr_buffer([(i, 0) for i in rest])
            n = ioctl(self.fd, uapi.KVM_GET_MSRS, buf, what="KVM_GET_MSRS")
            entries = buf.entries
            for k in range(n):
                out[entries[k].index] = entries[k].data
            rest = rest[n + 1 :]
        return out

    def set_msrs(self, values: dict[int, int]) -> list[int]:
        """Write MSRs; returns the ones KVM refused (it stops at the first it refuses)."""
        refused: list[int] = []
        rest = list(values.items())
        while rest:
            buf = self._msr_buffer(rest)
            n = ioctl(self.fd, uapi.KVM_SET_MSRS, buf, what="KVM_SET_MSRS")
            if n < len(rest):
                refused.append(rest[n][0])
            rest = rest[n + 1 :]
        return refused
