"""Linux KVM user API: ioctl numbers and kernel structs (x86-64), from <linux/kvm.h>.

This module and its siblings in ``vmferry.kvm`` are the only places that know them.
``tests/kvm/test_uapi.py`` compiles a program against the system headers and checks every
number and size here against it.
"""

from __future__ import annotations

import ctypes as C

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


REG_NAMES = (
    *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
    *("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"),
)


class KvmRegs(C.Structure):
    _fields_ = [(name, C.c_uint64) for name in REG_NAMES]


class KvmSegment(C.Structure):
    _fields_ = [
        ("base", C.c_uint64),
        ("limit", C.c_uint32),
        ("selector", C.c_uint16),
        ("type", C.c_uint8),
        ("present", C.c_uint8),
        ("dpl", C.c_uint8),
        ("db", C.c_uint8),
        ("s", C.c_uint8),
        ("l", C.c_uint8),
        ("g", C.c_uint8),
        ("avl", C.c_uint8),
        ("unusable", C.c_uint8),
        ("padding", C.c_uint8),
    ]


class KvmDtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


class KvmSregs(C.Structure):
    _fields_ = [
        *[(name, KvmSegment) for name in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]],
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *[(name, C.c_uint64) for name in ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]],
        ("interrupt_bitmap", C.c_uint64 * 4),
    ]


class KvmUserspaceMemoryRegion(C.Structure):
    _fields_ = [
        ("slot", C.c_uint32),
        ("flags", C.c_uint32),
        ("guest_phys_addr", C.c_uint64),
        ("memory_size", C.c_uint64),
        ("userspace_addr", C.c_uint64),
    ]


class KvmDirtyLog(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("padding", C.c_uint32), ("dirty_bitmap", C.c_uint64)]


class KvmClearDirtyLog(C.Structure):
    _fields_ = [
        ("slot", C.c_uint32),
        ("num_pages", C.c_uint32),
        ("first_page", C.c_uint64),
        ("dirty_bitmap", C.c_uint64),
    ]


class KvmEnableCap(C.Structure):
    _fields_ = [
        ("cap", C.c_uint32),
        ("flags", C.c_uint32),
        ("args", C.c_uint64 * 4),
        ("pad", C.c_uint8 * 64),
    ]


class KvmCpuidEntry2(C.Structure):
    _fields_ = [
        ("function", C.c_uint32),
        ("index", C.c_uint32),
        ("flags", C.c_uint32),
        ("eax", C.c_uint32),
        ("ebx", C.c_uint32),
        ("ecx", C.c_uint32),
        ("edx", C.c_uint32),
        ("padding", C.c_uint32 * 3),
    ]


class KvmMsrEntry(C.Structure):
    _fields_ = [("index", C.c_uint32), ("reserved", C.c_uint32), ("data", C.c_uint64)]


class KvmClockData(C.Structure):
    _fields_ = [
        ("clock", C.c_uint64),
        ("flags", C.c_uint32),
        ("pad0", C.c_uint32),
        ("realtime", C.c_uint64),
        ("host_tsc", C.c_uint64),
        ("pad", C.c_uint32 * 4),
    ]


class KvmRunIo(C.Structure):
    _fields_ = [
        ("direction", C.c_uint8),
        ("size", C.c_uint8),
        ("port", C.c_uint16),
        ("count", C.c_uint32),
        ("data_offset", C.c_uint64),
    ]


class KvmRunMmio(C.Structure):
    _fields_ = [
        ("phys_addr", C.c_uint64),
        ("data", C.c_uint8 * 8),
        ("len", C.c_uint32),
        ("is_write", C.c_uint8),
    ]


class KvmRunExit(C.Union):
    _fields_ = [
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("hardware_entry_failure_reason", C.c_uint64),
        ("internal_suberror", C.c_uint32),
        ("raw", C.c_uint8 * 256),
    ]


class KvmRunHeader(C.Structure):
    """The first part of the shared ``struct kvm_run`` page (the rest is not used)."""

    _fields_ = [
        ("request_interrupt_window", C.c_uint8),
        ("immediate_exit", C.c_uint8),
        ("padding1", C.c_uint8 * 6),
        ("exit_reason", C.c_uint32),
        ("ready_for_interrupt_injection", C.c_uint8),
        ("if_flag", C.c_uint8),
        ("flags", C.c_uint16),
        ("cr8", C.c_uint64),
        ("apic_base", C.c_uint64),
        ("exit", KvmRunExit),
    ]


# Sizes of structs vmferry treats as opaque blobs (saved and restored byte for byte).
SIZEOF_FPU = 416
SIZEOF_XSAVE = 4096
SIZEOF_XCRS = 392
SIZEOF_VCPU_EVENTS = 64
SIZEOF_DEBUGREGS = 128
SIZEOF_MP_STATE = 4

# /dev/kvm ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)

# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, C.sizeof(KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, C.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_ENABLE_CAP = _iow(0xA3, C.sizeof(KvmEnableCap))
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, C.sizeof(KvmClearDirtyLog))
KVM_SET_CLOCK = _iow(0x7B, C.sizeof(KvmClockData))
KVM_GET_CLOCK = _ior(0x7C, C.sizeof(KvmClockData))

# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, C.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, C.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, C.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, C.sizeof(KvmSregs))
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_GET_FPU = _ior(0x8C, SIZEOF_FPU)
KVM_SET_FPU = _iow(0x8D, SIZEOF_FPU)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_MP_STATE = _ior(0x98, SIZEOF_MP_STATE)
KVM_SET_MP_STATE = _iow(0x99, SIZEOF_MP_STATE)
KVM_GET_VCPU_EVENTS = _ior(0x9F, SIZEOF_VCPU_EVENTS)
KVM_SET_VCPU_EVENTS = _iow(0xA0, SIZEOF_VCPU_EVENTS)
KVM_GET_DEBUGREGS = _ior(0xA1, SIZEOF_DEBUGREGS)
KVM_SET_DEBUGREGS = _iow(0xA2, SIZEOF_DEBUGREGS)
KVM_GET_XSAVE = _ior(0xA4, SIZEOF_XSAVE)
KVM_SET_XSAVE = _iow(0xA5, SIZEOF_XSAVE)
KVM_GET_XCRS = _ior(0xA6, SIZEOF_XCRS)
KVM_SET_XCRS = _iow(0xA7, SIZEOF_XCRS)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE2 = _ior(0xCF, SIZEOF_XSAVE)

# Capabilities
KVM_CAP_USER_MEMORY = 3
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_XSAVE2 = 208

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_API_VERSION = 12

# Exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
}

# MSRs vmferry names (x86 architectural numbers)
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
