"""Device memory: a parent GPU's VRAM on a memfd (sparse until touched, like guest RAM),
and a vGPU's share of it with the dirty-page bitmap that VRAM pre-copy re-sends from."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading

import numpy as np
import numpy.typing as npt

from vmferry.devices.vgpu.types import GPU_PAGE
from vmferry.errors import VmferryError

PAGE_SHIFT = 12
PIECE = 64 << 20  # the framework's largest stream piece


class VramError(VmferryError):
    """An access outside a VRAM share (a mediator bug: the scanner should have refused)."""


class ParentVram:
    """The physical GPU's memory. vGPUs see only their shares of it."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.fd = os.memfd_create(f"vmferry-vram-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except OSError as e:
            os.close(self.fd)
            raise VmferryError(f"cannot back {size >> 20} MiB of VRAM for {name}: {e}") from e
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8)

    def close(self) -> None:
        if self.fd >= 0:
            del self.bytes
            with contextlib.suppress(BufferError):
                self._map.close()
            os.close(self.fd)
            self.fd = -1


class VramShare:
    """One vGPU's share: its bytes, and which of its pages changed since last saved.

    Writers call :meth:`written` *after* the bytes are in place, and savers clear bits
    *before* they copy, so a write racing a save is either in the copy or marked again.
    """

    def __init__(self, parent: ParentVram, offset: int, size: int) -> None:
        if offset < 0 or size <= 0 or offset + size > parent.size or size % GPU_PAGE:
            raise VramError(f"VRAM share {offset:#x}+{size:#x} is outside {parent.size:#x}")
        self.offset = offset
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self.bytes: npt.NDArray[np.uint8] = parent.bytes[offset : offset + size]
        self._dirty = np.zeros(self.npages, dtype=bool)
        self._lock = threading.Lock()

    def check(self, off: int, n: int) -> None:
        if off < 0 or n < 0 or off + n > self.size:
            raise VramError(f"VRAM access {off:#x}+{n:#x} is outside the share of {self.size:#x}")

    def written(self, off: int, n: int) -> None:
        if n > 0:
            with self._lock:
                self._dirty[off >> PAGE_SHIFT : ((off + n - 1) >> PAGE_SHIFT) + 1] = True

    def dirty_count(self) -> int:
        return int(np.count_nonzero(self._dirty))

    def clear_dirty(self) -> None:
        with self._lock:
            self._dirty[:] = False

    def take_dirty(self, limit: int) -> npt.NDArray[np.int64]:
        """Up to ``limit`` dirty page numbers, cleared as taken (the caller copies them next)."""
        with self._lock:
            pages = np.flatnonzero(self._dirty)[:limit]
            self._dirty[pages] = False
        return pages

    def pages_data(self, pages: npt.NDArray[np.int64]) -> bytes:
        """The content of ``pages``, one gather (no loop per page)."""
        view = self.bytes.reshape(self.npages, GPU_PAGE)
        return view[pages].tobytes()

    def store_pages(self, pages: npt.NDArray[np.int64], data: bytes) -> None:
        if pages.size and (pages.min() < 0 or pages.max() >= self.npages):
            raise VramError(f"VRAM page {int(pages.max())} is outside the share")
        if len(data) != pages.size * GPU_PAGE:
            raise VramError(f"{pages.size} VRAM pages in {len(data)} bytes")
        view = self.bytes.reshape(self.npages, GPU_PAGE)
        view[pages] = np.frombuffer(data, dtype=np.uint8).reshape(-1, GPU_PAGE)

    def pieces(self) -> list[memoryview]:
        """The whole share as views of at most 64 MiB: copied only as the stream reads them."""
        return [
            memoryview(self.bytes[o : o + PIECE])  # type: ignore[arg-type]
            for o in range(0, self.size, PIECE)
        ]
