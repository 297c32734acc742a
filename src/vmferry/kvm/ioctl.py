"""ioctl through ctypes: the GIL is released, and EINTR comes back to the caller."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
from typing import Any

from vmferry.errors import KvmError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl_raw(fd: int, request: int, arg: int | None = 0) -> tuple[int, int]:
    """Issue an ioctl; returns (result, errno) without raising. ``arg`` is an int or pointer."""
    ret = _libc.ioctl(fd, request, arg)
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def ioctl(fd: int, request: int, arg: Any = 0, *, what: str) -> int:
    """Issue an ioctl with an int or a ctypes object (passed by reference); raise on error."""
    if isinstance(arg, int):
        ptr: int | None = arg
    else:
        ptr = ctypes.addressof(arg)
    while True:
        ret, err = ioctl_raw(fd, request, ptr)
        if ret >= 0:
            return ret
        if err != errno.EINTR:
            raise KvmError(what, err)
