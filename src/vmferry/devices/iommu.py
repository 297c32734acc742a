"""The IOMMU every device DMA goes through: IOVA→RAM translation and DMA dirty tracking.

Tracking modes, chosen per device:

- ``iommu``: the IOMMU records every page a DMA write touches, as VT-d scalable-mode
  second-stage A/D bits, AMD IOMMU HD or SMMUv3 HTTU do; reading the bitmap clears it
  (IOMMUFD ``HWPT_GET_DIRTY_BITMAP`` without NO_CLEAR).
- ``device``: the device logs its own writes (VFIO DMA logging, features 6/7/8); the
  IOMMU reports each write to the device's logger.
- ``mediated``: the device's host-side mediator knows, from the descriptors and commands
  it parses, which guest pages the device will write, and reports them itself (Yan Zhao's
  X710 RFC; gMig for GVT-g).
- ``none``: nothing is tracked; the device's dirty log (dirtylog.py) reports every
  DMA-mapped page dirty at every sync (legacy type1 — correct and costly).
- ``broken``: writes go untracked and nobody compensates (tests only: verification must
  catch it).

A page gate (``set_page_gate``) makes every DMA wait for the RAM it will touch, as a PCIe
device with ATS/PRI raises a page request and waits: post-copy's destination sets one
while pages are still missing, since touching a missing page from Python with the GIL
held would deadlock the in-process fault server. Every access to RAM here goes through
``_gated`` after translation; with no gate that costs one attribute check.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vmferry.errors import VmferryError
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory


class DirtyTracking(enum.Enum):
    IOMMU = "iommu"
    DEVICE = "device"
    MEDIATED = "mediated"
    NONE = "none"
    BROKEN = "broken"


class DmaFault(VmferryError):
    """A device addressed memory its IOMMU domain does not map."""


@dataclass(frozen=True)
class IovaMapping:
    iova: int
    size: int
    ram_offset: int

    @property
    def end(self) -> int:
        return self.iova + self.size


WriteLogger = Callable[[int, int], None]  # (iova, length) of a DMA write
RamPieces = Sequence[tuple[int, int]]  # (RAM offset, length) after translation


class PageGate(Protocol):
    """Called before a DMA touches RAM, with the translated pieces it will touch; returns
    once they may be touched, or raises (a DmaFault, so the device sees a DMA fault)."""

    def before_access(self, pieces: RamPieces, what: str) -> None: ...


def cover_ranges(ranges: list[tuple[int, int]], page_size: int) -> list[tuple[int, int]]:
    """(iova, length) ranges widened to whole ``page_size`` blocks, the blocks they then
    share merged: what a DMA log at that granularity tracks (a 2 MiB log page holding two
    mappings is one block, read and cleared once)."""
    out: list[tuple[int, int]] = []
    for iova, n in sorted(ranges):
        lo = iova - iova % page_size
        hi = -(-(iova + n) // page_size) * page_size
        if out and lo <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(hi, start + out[-1][1]) - start)
        else:
            out.append((lo, hi - lo))
    return out


class Iommu:
    """One device's IOMMU domain. Maps IOVA = GPA for all of RAM unless told otherwise."""

    def __init__(
        self, memory: GuestMemory, mode: DirtyTracking, *, identity: bool = True, name: str = ""
    ) -> None:
        self.memory = memory
        self.mode = mode
        self.name = name  # the device's, for the errors a gate raises
        self._gate: PageGate | None = None
        self._maps: list[IovaMapping] = []
        self._lock = threading.Lock()
        self._dirty = DirtyBitmap(memory.npages)  # "A/D bits", RAM-page indexed
        self.tracking = False
        self.device_logger: WriteLogger | None = None
        self.bytes_written = 0
        if identity:
            for r in memory.regions:
                self.map(r.gpa, r.size, r.gpa)

    # ---- mappings
    def map(self, iova: int, size: int, gpa: int) -> None:
        if iova % PAGE_SIZE or size % PAGE_SIZE or gpa % PAGE_SIZE or size <= 0:
            raise DmaFault(f"IOMMU map {iova:#x}+{size:#x}→{gpa:#x} is not page aligned")
        off = self.memory.gpa_to_offset(gpa, size)
        with self._lock:
            if any(m.iova < iova + size and iova < m.end for m in self._maps):
                raise DmaFault(f"IOMMU map {iova:#x}+{size:#x} overlaps a mapping")
            self._maps.append(IovaMapping(iova, size, off))
            self._maps.sort(key=lambda m: m.iova)

    def unmap(self, iova: int, size: int) -> None:
        with self._lock:
            self._maps = [m for m in self._maps if not (m.iova == iova and m.size == size)]

    @property
    def mappings(self) -> list[IovaMapping]:
        return list(self._maps)

    def mapped_pages(self) -> npt.NDArray[np.int64]:
        """RAM pages reachable by DMA (what ``none`` mode must treat as always dirty)."""
        parts = [
            np.arange(m.ram_offset >> PAGE_SHIFT, (m.ram_offset + m.size) >> PAGE_SHIFT)
            for m in self._maps
        ]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def translate(self, iova: int, length: int) -> list[tuple[int, int]]:
        """(ram_offset, length) pieces covering [iova, iova+length), or DmaFault."""
        out: list[tuple[int, int]] = []
        pos, end = iova, iova + length
        maps = self._maps
        while pos < end:
            m = next((m for m in maps if m.iova <= pos < m.end), None)
            if m is None:
                raise DmaFault(
                    f"DMA to IOVA {pos:#x} ({length} bytes from {iova:#x}) is not mapped"
                )
            n = min(end, m.end) - pos
            out.append((m.ram_offset + pos - m.iova, n))
            pos += n
        return out

    # ---- the page gate (post-copy: ATS/PRI)
    def set_page_gate(self, gate: PageGate | None) -> None:
        """From now on every DMA calls ``gate.before_access`` before touching RAM (None:
        no gate). A DMA already past its gate when this changes completes as it was."""
        self._gate = gate

    @property
    def page_gate(self) -> PageGate | None:
        return self._gate

    def _what(self, what: str) -> str:
        return f"{self.name}: {what}" if self.name else what

    def _gated(self, pieces: list[tuple[int, int]], op: str, iova: int) -> None:
        gate = self._gate  # read once: the gate may be cleared since the caller looked
        if gate is not None:
            gate.before_access(pieces, self._what(f"{op} {iova:#x}"))

    def request_pages(self, ranges: Sequence[tuple[int, int]], what: str = "DMA") -> None:
        """Page requests for every (iova, length) range a DMA is about to touch, all out
        before any is waited for (a device that knows its whole transfer asks at once,
        not one piece per round trip). Nothing to do without a gate; DmaFault as a DMA."""
        gate = self._gate
        if gate is None:
            return
        pieces = [p for iova, n in ranges if n > 0 for p in self.translate(iova, n)]
        if pieces:
            gate.before_access(pieces, self._what(what))

    # ---- DMA
    def read(self, iova: int, length: int) -> npt.NDArray[np.uint8]:
        """A copy of guest memory at IOVA (vectorised, one slice per mapping piece)."""
        pieces = self.translate(iova, length)
        if self._gate is not None:
            self._gated(pieces, "DMA read", iova)
        b = self.memory.bytes
        if len(pieces) == 1:
            off, n = pieces[0]
            return b[off : off + n].copy()
        return np.concatenate([b[off : off + n] for off, n in pieces])

    def write(self, iova: int, data: npt.NDArray[np.uint8] | bytes) -> None:
        arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
        pieces = self.translate(iova, arr.size)
        if self._gate is not None:
            self._gated(pieces, "DMA write", iova)
        b = self.memory.bytes
        pos = 0
        for off, n in pieces:
            b[off : off + n] = arr[pos : pos + n]
            pos += n
        self.bytes_written += arr.size
        self._track(iova, arr.size, pieces)

    def _track(self, iova: int, length: int, pieces: list[tuple[int, int]]) -> None:
        if self.mode is DirtyTracking.IOMMU and self.tracking:
            with self._lock:
                for off, n in pieces:
                    first = off >> PAGE_SHIFT
                    last = (off + n - 1) >> PAGE_SHIFT
                    self._dirty.set_range(first, last - first + 1)
        elif self.mode is DirtyTracking.DEVICE and self.device_logger is not None:
            self.device_logger(iova, length)

    # ---- IOMMU dirty tracking (HWPT_SET_DIRTY_TRACKING / HWPT_GET_DIRTY_BITMAP)
    def set_dirty_tracking(self, on: bool) -> None:
        with self._lock:
            self.tracking = on and self.mode is DirtyTracking.IOMMU
            self._dirty.clear()

    def read_and_clear_dirty(self, into: DirtyBitmap) -> None:
        """OR the pages DMA dirtied since the last read into ``into``, and clear them."""
        with self._lock:
            into.merge(self._dirty)
            self._dirty.clear()
