"""A KVM VM handle: memory slots, dirty log (manual clear by range), clock, vCPU creation."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import numpy.typing as npt

from vmferry.errors import KvmError
from vmferry.kvm import uapi
from vmferry.kvm.ioctl import ioctl
from vmferry.kvm.system import Kvm


class VmHandle:
    """One KVM VM. Owns its fd; the system handle must outlive it."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm.create_vm_fd()
        try:
            cap = uapi.KvmEnableCap(cap=uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            # Without INITIALLY_SET: enabling the log write-protects every page at once, so the
            # first KVM_GET_DIRTY_LOG reports exactly what the guest wrote since.
            cap.args[0] = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            ioctl(self.fd, uapi.KVM_ENABLE_CAP, cap, what="KVM_ENABLE_CAP(MANUAL_DIRTY_LOG)")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, *, log_dirty: bool
    ) -> None:
        region = uapi.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=uapi.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=host_addr,
        )
        ioctl(
            self.fd,
            uapi.KVM_SET_USER_MEMORY_REGION,
            region,
            what=f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {gpa:#x}, {size:#x} bytes)",
        )

    def get_dirty_log(self, slot: int, bitmap: npt.NDArray[np.uint64]) -> None:
        """Fill ``bitmap`` (one bit per page of the slot) with pages dirtied since last clear."""
        log = uapi.KvmDirtyLog(slot=slot, dirty_bitmap=bitmap.ctypes.data)
        ioctl(self.fd, uapi.KVM_GET_DIRTY_LOG, log, what=f"KVM_GET_DIRTY_LOG(slot {slot})")

    def clear_dirty_log(
        self, slot: int, first_page: int, bitmap: npt.NDArray[np.uint64], num_pages: int
    ) -> None:
        """Re-protect the pages whose bits are set in ``bitmap`` (bit 0 = ``first_page``).

        KVM wants ``first_page`` a multiple of 64 and ``num_pages`` a multiple of 64 unless the
        range ends at the end of the slot.
        """
        log = uapi.KvmClearDirtyLog(
            slot=slot,
            num_pages=num_pages,
            first_page=first_page,
            dirty_bitmap=bitmap.ctypes.data,
        )
        ioctl(
            self.fd,
            uapi.KVM_CLEAR_DIRTY_LOG,
            log,
            what=f"KVM_CLEAR_DIRTY_LOG(slot {slot}, pages {first_page}+{num_pages})",
        )

    def get_clock(self) -> bytes:
        data = uapi.KvmClockData()
        ioctl(self.fd, uapi.KVM_GET_CLOCK, data, what="KVM_GET_CLOCK")
        return bytes(data)

    def set_clock(self, raw: bytes) -> None:
        data = uapi.KvmClockData.from_buffer_copy(raw)
        # Only the clock value is restored; flags from another host do not apply here.
        data.flags = 0
        ioctl(self.fd, uapi.KVM_SET_CLOCK, data, what="KVM_SET_CLOCK")

    def create_vcpu_fd(self, index: int) -> int:
        try:
            return ioctl(self.fd, uapi.KVM_CREATE_VCPU, index, what=f"KVM_CREATE_VCPU({index})")
        except KvmError:
            raise

    def __enter__(self) -> VmHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def c_buffer(size: int) -> ctypes.Array[ctypes.c_char]:
    """A zeroed, mutable buffer for variable-size structs (XSAVE and friends)."""
    return ctypes.create_string_buffer(size)
