"""userfaultfd(2): missing pages of guest RAM reported to, and filled by, this process.

The raw uAPI (numbers and struct layouts of Linux's include/uapi/linux/userfaultfd.h,
x86-64; ``tests/memory/test_userfaultfd.py`` checks them against the system header) and
:class:`UserFault`, one handle per userfaultfd: register a range of a mapping in missing
mode, read fault events (decoded as arrays), fill pages with COPY or zeros, wake waiters.

Mind the GIL: a thread that faults on a registered page while holding the GIL (slicing an
mmap, indexing a numpy view) blocks there with the GIL held, so a fault server written in
Python can never run again. Registered memory is touched only from calls that release the
GIL (KVM_RUN, ctypes), or the faults are served by another process. Every call here that
can wait (poll, read, the ioctls) releases the GIL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import select
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmferry.errors import VmferryError
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory

# ---- the uAPI, as facts
SYS_USERFAULTFD = 323  # x86-64
DEV_USERFAULTFD = "/dev/userfaultfd"  # Linux 6.1: access is by file mode, not by sysctl
UFFD_USER_MODE_ONLY = 1  # flag of the syscall: faults taken in kernel mode are not handled
UFFD_API = 0xAA
_UFFDIO = 0xAA
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_UFFDIO << 8) | nr


USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, 0x00, 0)  # on /dev/userfaultfd: a new userfaultfd
_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE = 0x00, 0x01, 0x02
_UFFDIO_COPY, _UFFDIO_ZEROPAGE, _UFFDIO_MOVE = 0x03, 0x04, 0x05
_UFFDIO_WRITEPROTECT, _UFFDIO_CONTINUE, _UFFDIO_POISON = 0x06, 0x07, 0x08
_UFFDIO_API = 0x3F

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # 6.4+; newer than this host's linux-libc-dev
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0


class UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),  # bytes copied, or a negative errno
    ]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class UffdioContinue(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("mapped", ctypes.c_int64)]


UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_API, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_REGISTER, ctypes.sizeof(UffdioRegister))
# The kernel reads these two, but they were declared _IOR: the numbers are what they are.
UFFDIO_UNREGISTER = _ioc(_IOC_READ, _UFFDIO_UNREGISTER, ctypes.sizeof(UffdioRange))
UFFDIO_WAKE = _ioc(_IOC_READ, _UFFDIO_WAKE, ctypes.sizeof(UffdioRange))
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_COPY, ctypes.sizeof(UffdioCopy))
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_ZEROPAGE, ctypes.sizeof(UffdioZeropage))
UFFDIO_CONTINUE = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_CONTINUE, ctypes.sizeof(UffdioContinue))

# struct uffd_msg (packed, 32 bytes), as the pagefault arm of its union.
UFFD_MSG_SIZE = 32
UFFD_MSG = np.dtype(
    {
        "names": ["event", "flags", "address", "ptid"],
        "formats": ["u1", "<u8", "<u8", "<u4"],
        "offsets": [0, 8, 16, 24],
        "itemsize": UFFD_MSG_SIZE,
    }
)
ZERO_CHUNK = 2 << 20  # zeros per COPY where a range has no UFFDIO_ZEROPAGE
READ_BATCH = 128  # events per read(2): a burst of vCPU and device faults in one call

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long]
_libc.syscall.restype = ctypes.c_long


class UserFaultError(VmferryError):
    """A userfaultfd operation failed (the operation, the range and the errno say which)."""


class UserFaultUnavailable(UserFaultError):
    """No userfaultfd can be had here (kernel, sysctl or permissions)."""


@dataclass(frozen=True)
class FaultBatch:
    """Page faults read in one go, as arrays (one element per event, in arrival order)."""

    address: npt.NDArray[np.uint64]  # page-aligned host address of the fault
    flags: npt.NDArray[np.uint64]  # UFFD_PAGEFAULT_FLAG_*
    ptid: npt.NDArray[np.uint32]  # faulting thread id (with UFFD_FEATURE_THREAD_ID)

    def __len__(self) -> int:
        return int(self.address.size)

    @property
    def write(self) -> npt.NDArray[np.bool_]:
        mask: npt.NDArray[np.bool_] = (self.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0
        return mask

    def pages(self) -> npt.NDArray[np.uint64]:
        """Distinct faulting page addresses, sorted: several threads may wait on one page."""
        return np.unique(self.address & ~np.uint64(PAGE_SIZE - 1))


def decode_messages(raw: bytes | bytearray | memoryview) -> FaultBatch:
    """uffd_msg records → a FaultBatch. Only page faults are expected (no EVENT_* feature is
    asked for), so anything else is an error rather than something to skip."""
    if len(raw) % UFFD_MSG_SIZE:
        raise UserFaultError(
            f"userfaultfd read returned {len(raw)} bytes, not a multiple of {UFFD_MSG_SIZE}"
        )
    msgs = np.frombuffer(raw, dtype=UFFD_MSG)
    other = msgs["event"] != UFFD_EVENT_PAGEFAULT
    if other.any():
        raise UserFaultError(
            f"userfaultfd sent event {int(msgs['event'][other][0]):#x}, expected only page "
            f"faults ({UFFD_EVENT_PAGEFAULT:#x})"
        )
    return FaultBatch(
        address=msgs["address"].copy(), flags=msgs["flags"].copy(), ptid=msgs["ptid"].copy()
    )


_HINTS = {
    errno.EEXIST: "already there",
    errno.ENOENT: "not in a range this userfaultfd registered (or the mapping changed)",
    errno.ESRCH: "the process owning the memory is exiting",
    errno.EINVAL: "bad range, alignment or mode",
    errno.EPERM: "not permitted",
    errno.ENOMEM: "out of memory",
}


def _fail(what: str, err: int) -> UserFaultError:
    hint = _HINTS.get(err)
    tail = f" ({hint})" if hint else ""
    return UserFaultError(f"{what} failed: {os.strerror(err)} (errno {err}){tail}")


def _open_fd(flags: int) -> int:
    """The syscall first; /dev/userfaultfd where the sysctl refuses unprivileged callers."""
    fd = _libc.syscall(SYS_USERFAULTFD, flags)
    if fd >= 0:
        return int(fd)
    sys_err = ctypes.get_errno()
    try:
        dev = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise UserFaultUnavailable(
            f"userfaultfd(2) failed: {os.strerror(sys_err)} (errno {sys_err}), and "
            f"{DEV_USERFAULTFD} cannot be opened: {e.strerror} (a full userfaultfd needs "
            "root, CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or access to "
            f"{DEV_USERFAULTFD})"
        ) from e
    try:
        fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise UserFaultUnavailable(
                f"USERFAULTFD_IOC_NEW on {DEV_USERFAULTFD} failed: {os.strerror(err)} (errno {err})"
            )
        return int(fd)
    finally:
        os.close(dev)


def _zero_source() -> tuple[mmap.mmap, int]:
    """Zeros to COPY where a range has no ZEROPAGE: anonymous, never written, so free."""
    zero = mmap.mmap(-1, ZERO_CHUNK, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    return zero, ctypes.addressof(ctypes.c_char.from_buffer(zero))


class UserFault:
    """One userfaultfd (non-blocking, close-on-exec) with the ranges it registered.

    ``user_mode_only`` asks for UFFD_USER_MODE_ONLY: allowed to more callers, but a fault
    taken inside the kernel on the process's behalf (KVM's get_user_pages for a vCPU,
    read(2) into the range) is then not reported, so a VM's RAM needs a full one."""

    def __init__(
        self,
        *,
        features: int = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_THREAD_ID,
        user_mode_only: bool = False,
    ) -> None:
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
        self.fd = _open_fd(flags)
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, ioctls bitmap)
        self._zero, self._zero_addr = _zero_source()
        api = UffdioApi(api=UFFD_API, features=features, ioctls=0)
        try:
            self._ioctl(UFFDIO_API, api, f"UFFDIO_API (features {features:#x})")
        except UserFaultError:
            self.close()
            raise
        self.features = int(api.features)
        self.api_ioctls = int(api.ioctls)

    @property
    def ranges(self) -> list[tuple[int, int, int]]:
        """Registered ranges as (start, end, ioctls): what :meth:`adopt` needs."""
        return list(self._ranges)

    @classmethod
    def adopt(cls, fd: int, ranges: list[tuple[int, int, int]]) -> UserFault:
        """A userfaultfd another process opened and registered, received by fd: a fault
        server outside the VMM, so no fault can ever wait on this process's GIL. Its COPY
        reads ``src`` here and writes into the registering process's memory."""
        self = cls.__new__(cls)
        self.fd = fd
        self._ranges = list(ranges)
        self._zero, self._zero_addr = _zero_source()
        self.features = self.api_ioctls = 0  # negotiated by the owner
        return self

    # ---- plumbing
    def _ioctl(self, request: int, arg: ctypes.Structure, what: str) -> None:
        if self.fd < 0:
            raise UserFaultError(f"{what}: the userfaultfd is closed")
        while _libc.ioctl(self.fd, request, ctypes.addressof(arg)) < 0:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise _fail(what, err)

    def _range_ioctls(self, addr: int, length: int, what: str) -> int:
        """The ioctls allowed on [addr, addr+length), which must be page-aligned and lie
        inside one registered range (checked here, so the error says which ranges exist)."""
        if self.fd < 0:
            raise UserFaultError(f"{what} {addr:#x}+{length:#x}: the userfaultfd is closed")
        if addr % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise UserFaultError(
                f"{what} {addr:#x}+{length:#x}: address and length must be whole pages"
            )
        for start, end, ioctls in self._ranges:
            if start <= addr and addr + length <= end:
                return ioctls
        known = ", ".join(f"{s:#x}-{e:#x}" for s, e, _ in self._ranges) or "none"
        raise UserFaultError(
            f"{what} {addr:#x}+{length:#x} is outside every registered range ({known})"
        )

    # ---- ranges
    def register(self, addr: int, length: int) -> int:
        """Register [addr, addr+length) in missing mode; returns the range's ioctl bitmap."""
        if addr % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise UserFaultError(
                f"UFFDIO_REGISTER {addr:#x}+{length:#x}: address and length must be whole pages"
            )
        reg = UffdioRegister(
            range=UffdioRange(addr, length), mode=UFFDIO_REGISTER_MODE_MISSING, ioctls=0
        )
        self._ioctl(UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER {addr:#x}+{length:#x}")
        if not reg.ioctls & (1 << _UFFDIO_COPY):
            self._ioctl(UFFDIO_UNREGISTER, UffdioRange(addr, length), "UFFDIO_UNREGISTER")
            raise UserFaultError(f"UFFDIO_REGISTER {addr:#x}+{length:#x}: no UFFDIO_COPY there")
        self._ranges.append((addr, addr + length, int(reg.ioctls)))
        return int(reg.ioctls)

    def register_memory(self, memory: GuestMemory, offset: int, length: int) -> int:
        """Register RAM offsets [offset, offset+length) of a guest's memfd mapping."""
        if offset < 0 or length <= 0 or offset + length > memory.size:
            raise UserFaultError(
                f"RAM range {offset:#x}+{length:#x} is outside guest memory ({memory.size:#x})"
            )
        return self.register(memory.host_addr + offset, length)

    def unregister(self, addr: int, length: int) -> None:
        self._range_ioctls(addr, length, "UFFDIO_UNREGISTER")
        self._ioctl(UFFDIO_UNREGISTER, UffdioRange(addr, length), f"UFFDIO_UNREGISTER {addr:#x}")
        kept: list[tuple[int, int, int]] = []
        for start, end, ioctls in self._ranges:
            if start < addr:
                kept.append((start, min(end, addr), ioctls))
            if end > addr + length:
                kept.append((max(start, addr + length), end, ioctls))
        self._ranges = kept

    # ---- events
    def wait(self, timeout: float | None) -> bool:
        """Whether faults are waiting to be read (poll(2) releases the GIL); False on timeout
        or once the fd is closed."""
        if self.fd < 0:
            return False
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        return any(ev & select.POLLIN for _, ev in p.poll(ms))

    def read_faults(self, max_events: int = READ_BATCH) -> FaultBatch:
        """Every fault queued now, up to ``max_events``; an empty batch if none."""
        if self.fd < 0:
            raise UserFaultError("read of fault events: the userfaultfd is closed")
        try:
            raw = os.read(self.fd, max_events * UFFD_MSG_SIZE)
        except BlockingIOError:
            raw = b""
        except OSError as e:
            raise UserFaultError(f"read of fault events failed: {e.strerror}") from e
        return decode_messages(raw)

    # ---- filling
    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_COPY ``length`` bytes from host address ``src`` into the missing pages at
        ``dst``. Pages already there (filled by another path first) are skipped and their
        waiters woken: post-copy's urgent and background paths race by design. Returns the
        bytes this call filled."""
        self._range_ioctls(dst, length, "UFFDIO_COPY")
        mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
        done = filled = 0
        while done < length:
            arg = UffdioCopy(dst=dst + done, src=src + done, len=length - done, mode=mode, copy=0)
            if _libc.ioctl(self.fd, UFFDIO_COPY, ctypes.addressof(arg)) >= 0:
                return filled + length - done
            err = ctypes.get_errno()
            n = max(0, int(arg.copy))  # what went in before the error
            done, filled = done + n, filled + n
            if err == errno.EEXIST:
                if wake:
                    self.wake(dst + done, PAGE_SIZE)
                done += PAGE_SIZE
            elif err not in (errno.EAGAIN, errno.EINTR):
                raise _fail(f"UFFDIO_COPY to {dst + done:#x}+{length - done:#x}", err)
        return filled

    def copy_from(
        self, dst: int, data: bytes | bytearray | memoryview, *, wake: bool = True
    ) -> int:
        """:meth:`copy` from a Python buffer (bytes, a numpy array's memoryview)."""
        view = memoryview(data).cast("B")
        length = len(view)
        if view.readonly:
            holder = ctypes.create_string_buffer(view.tobytes(), length)
            return self.copy(dst, ctypes.addressof(holder), length, wake=wake)
        buf = (ctypes.c_char * length).from_buffer(view)
        return self.copy(dst, ctypes.addressof(buf), length, wake=wake)

    def zeropage(self, dst: int, length: int, *, wake: bool = True) -> int:
        """Fill missing pages with zeros: UFFDIO_ZEROPAGE where the range offers it
        (anonymous memory), else a COPY from a zero page (shmem offers no ZEROPAGE)."""
        ioctls = self._range_ioctls(dst, length, "UFFDIO_ZEROPAGE")
        if ioctls & (1 << _UFFDIO_ZEROPAGE):
            mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE
            arg = UffdioZeropage(range=UffdioRange(dst, length), mode=mode, zeropage=0)
            try:
                self._ioctl(UFFDIO_ZEROPAGE, arg, f"UFFDIO_ZEROPAGE {dst:#x}+{length:#x}")
            except UserFaultError:
                if int(arg.zeropage) != -errno.EEXIST:
                    raise
                return self._zero_pages(dst, length, wake)  # partly there: COPY skips those
            return length
        return self._zero_pages(dst, length, wake)

    def _zero_pages(self, dst: int, length: int, wake: bool) -> int:
        return sum(
            self.copy(dst + off, self._zero_addr, min(ZERO_CHUNK, length - off), wake=wake)
            for off in range(0, length, ZERO_CHUNK)
        )

    def wake(self, addr: int, length: int) -> None:
        """Wake threads waiting on [addr, addr+length) (after fills with wake=False)."""
        self._range_ioctls(addr, length, "UFFDIO_WAKE")
        self._ioctl(UFFDIO_WAKE, UffdioRange(addr, length), f"UFFDIO_WAKE {addr:#x}+{length:#x}")

    # ---- teardown
    def close(self) -> None:
        """Close the fd. Threads waiting on a fault are woken and retry it as an ordinary
        fault (a missing shmem page then reads as zeros): nothing stays blocked."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._ranges = []

    def __enter__(self) -> UserFault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
