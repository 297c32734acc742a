"""The KVM system handle (/dev/kvm): API checks, capabilities, supported CPUID and MSRs."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from vmferry.errors import KvmError, KvmUnavailable
from vmferry.kvm import uapi
from vmferry.kvm.ioctl import ioctl, ioctl_raw

DEFAULT_DEVICE = "/dev/kvm"

# What vmferry cannot work without, with the reason a user would want to read.
REQUIRED_CAPS = {
    uapi.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY (guest RAM from user memory)",
    uapi.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT (kicking vCPUs out to pause them)",
    uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (dirty log "
    "cleared by range)",
    uapi.KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID (setting the guest CPUID)",
    uapi.KVM_CAP_XSAVE: "KVM_CAP_XSAVE (saving FPU/SSE/AVX state)",
    uapi.KVM_CAP_XCRS: "KVM_CAP_XCRS (saving XCR0)",
    uapi.KVM_CAP_VCPU_EVENTS: "KVM_CAP_VCPU_EVENTS (saving pending events)",
    uapi.KVM_CAP_DEBUGREGS: "KVM_CAP_DEBUGREGS (saving debug registers)",
    uapi.KVM_CAP_MP_STATE: "KVM_CAP_MP_STATE (saving the vCPU run state)",
    uapi.KVM_CAP_ADJUST_CLOCK: "KVM_CAP_ADJUST_CLOCK (saving the KVM clock)",
}


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class Kvm:
    """An open /dev/kvm. Owns its fd."""

    def __init__(self, device: str = DEFAULT_DEVICE) -> None:
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{device} does not exist: this host has no KVM (load kvm_intel/kvm_amd, "
                "or enable nested virtualisation)"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"no permission to open {device}: run as root or join the 'kvm' group"
            ) from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {device}: {e.strerror}") from None
        self.device = device
        try:
            version = ioctl(self.fd, uapi.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
            if version != uapi.KVM_API_VERSION:
                raise KvmUnavailable(
                    f"{device} speaks KVM API {version}, vmferry needs {uapi.KVM_API_VERSION}"
                )
            missing = [why for cap, why in REQUIRED_CAPS.items() if not self.check_extension(cap)]
            if missing:
                raise KvmUnavailable(f"{device} lacks " + "; ".join(missing))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        ret, _ = ioctl_raw(self.fd, uapi.KVM_CHECK_EXTENSION, cap)
        return max(ret, 0)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE, what="KVM_GET_VCPU_MMAP_SIZE")

    def create_vm_fd(self) -> int:
        return ioctl(self.fd, uapi.KVM_CREATE_VM, 0, what="KVM_CREATE_VM")

    def supported_cpuid(self) -> list[CpuidEntry]:
        nent = 256
        while True:
            entries_t = uapi.KvmCpuidEntry2 * nent

            class Cpuid2(ctypes.Structure):
                _fields_ = [
                    ("nent", ctypes.c_uint32),
                    ("padding", ctypes.c_uint32),
                    ("entries", entries_t),
                ]

            buf = Cpuid2(nent=nent)
            ret, err = ioctl_raw(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf))
            if ret >= 0:
                return [
                    CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in buf.entries[: buf.nent]
                ]
            if err != errno.E2BIG or nent >= 4096:
                raise KvmError("KVM_GET_SUPPORTED_CPUID", err)
            nent *= 2

    def msr_index_list(self) -> list[int]:
        """MSRs KVM says it saves and restores (not all of them are accepted on set)."""
        n = 1024

        class MsrList(ctypes.Structure):
            _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * n)]

        buf = MsrList(nmsrs=n)
        ioctl(self.fd, uapi.KVM_GET_MSR_INDEX_LIST, buf, what="KVM_GET_MSR_INDEX_LIST")
        return list(buf.indices[: buf.nmsrs])

    def xsave_size(self) -> int:
        """Bytes of XSAVE state KVM_GET_XSAVE2 returns (4096 when only KVM_GET_XSAVE exists)."""
        size = self.check_extension(uapi.KVM_CAP_XSAVE2)
        return max(size, uapi.SIZEOF_XSAVE)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
