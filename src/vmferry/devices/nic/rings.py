"""Descriptor rings of one VF queue pair, and the mediator's view of what RX will write.

Ring registers hold slot indices (0 … len−1), as on the X710: the device owns the slots
from head up to (not including) tail. When the guest writes an RX tail the device fetches
the new descriptors at once into its descriptor cache (``posted``), so what it later
writes is fixed at the doorbell — and so a mediator that traps that write knows, before
the device can write anything, which guest pages it will write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from vmferry.devices.iommu import Iommu
from vmferry.devices.nic.regs import DESC_SIZE, MAX_RING, MIN_RING
from vmferry.memory.guest_memory import PAGE_SHIFT

RING_ALIGN = 128


@dataclass
class Ring:
    base: int = 0
    len: int = 0
    head: int = 0
    tail: int = 0
    enabled: bool = False
    # RX only: buffer address fetched for each slot at the doorbell (descriptor cache).
    posted: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))

    def valid(self) -> bool:
        return (
            MIN_RING <= self.len <= MAX_RING
            and self.len & (self.len - 1) == 0
            and self.base % RING_ALIGN == 0
            and self.base > 0
        )

    def slots(self, start: int, end: int) -> npt.NDArray[np.int64]:
        """Slot numbers from ``start`` up to ``end`` (exclusive), wrapping."""
        n = (end - start) % self.len if self.len else 0
        return (start + np.arange(n, dtype=np.int64)) % max(self.len, 1)

    def in_flight(self) -> int:
        return (self.tail - self.head) % self.len if self.len else 0

    def desc_addr(self, slot: int) -> int:
        return self.base + DESC_SIZE * slot

    def reset(self) -> None:
        self.head = self.tail = 0
        self.posted = np.zeros(self.len if self.valid() else 0, np.uint64)

    def fetch(self, iommu: Iommu, new_tail: int) -> npt.NDArray[np.int64]:
        """The doorbell: cache the buffer addresses of the slots from tail to ``new_tail``
        (one DMA read of the ring) and return those slots."""
        slots = self.slots(self.tail, new_tail)
        if slots.size:
            raw = iommu.read(self.base, self.len * DESC_SIZE).view(np.uint64)
            if self.posted.size != self.len:
                self.posted = np.zeros(self.len, np.uint64)
            self.posted[slots] = raw[2 * slots]
        self.tail = new_tail
        return slots

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "base": self.base,
            "len": self.len,
            "head": self.head,
            "tail": self.tail,
            "enabled": self.enabled,
        }
        slots = self.slots(self.head, self.tail)
        if self.posted.size and slots.size:
            out["posted"] = [int(a) for a in self.posted[slots]]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ring:
        r = cls(int(d["base"]), int(d["len"]), int(d["head"]), int(d["tail"]), bool(d["enabled"]))
        if r.len and not (0 <= r.head < r.len and 0 <= r.tail < r.len):
            raise ValueError(f"ring head {r.head} / tail {r.tail} outside its {r.len} slots")
        r.posted = np.zeros(r.len if r.valid() else 0, np.uint64)
        posted = d.get("posted", [])
        slots = r.slots(r.head, r.tail)
        if len(posted) != (slots.size if r.posted.size else 0):
            raise ValueError(f"{len(posted)} cached descriptors for {slots.size} posted slots")
        if posted:
            r.posted[slots] = np.array(posted, dtype=np.uint64)
        return r


def gpa_pages_to_ram(iommu: Iommu, gpas: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """RAM page indices of guest-physical pages (IOVA = GPA), one pass per mapping."""
    pages = np.unique(gpas.astype(np.int64) >> PAGE_SHIFT)
    out = []
    for m in iommu.mappings:
        lo, hi = m.iova >> PAGE_SHIFT, m.end >> PAGE_SHIFT
        sel = pages[(pages >= lo) & (pages < hi)]
        out.append(sel - lo + (m.ram_offset >> PAGE_SHIFT))
    return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)


class RxMediator:
    """``mediated`` tracking: pages RX DMA wrote or may write since the last report.

    Each report covers, per RX ring, the slots from the head at the last report to the
    current tail (the caller holds the device's lock, so no DMA moves the head meanwhile)
    — buffers written since then and buffers still posted (the device may
    write them any time, even right after this report) — plus every ring's descriptor
    pages, which the device writes back. Slots dropped by a queue reset are kept until
    the next report.
    """

    def __init__(self) -> None:
        self._marks: dict[int, int] = {}
        self._carried: list[npt.NDArray[np.uint64]] = []

    def _spans(self, ring: Ring, start: int | None, buf_size: int) -> npt.NDArray[np.uint64]:
        # No mark yet (the first report since tracking began): every slot the ring ever
        # had posted may have been written since, so all of them count.
        slots = (
            np.arange(ring.len, dtype=np.int64) if start is None else ring.slots(start, ring.tail)
        )
        if not slots.size or not ring.posted.size:
            return np.zeros(0, np.uint64)
        addrs = ring.posted[slots]
        addrs = addrs[addrs != 0]
        steps = np.arange(0, buf_size + 4096, 4096, dtype=np.uint64)
        ends = addrs + np.uint64(max(buf_size, 1) - 1)
        spans = np.minimum(addrs[:, None] + steps[None, :], ends[:, None])
        return np.asarray(spans.ravel(), dtype=np.uint64)

    def queue_reset(self, q: int, ring: Ring, buf_size: int) -> None:
        self._carried.append(self._spans(ring, self._marks.get(q), buf_size))
        self._marks[q] = 0

    def report(
        self, iommu: Iommu, rx: list[Ring], tx: list[Ring], buf_size: int
    ) -> npt.NDArray[np.int64]:
        parts = self._carried
        self._carried = []
        for q, ring in enumerate(rx):
            if ring.len:
                parts.append(self._spans(ring, self._marks.get(q), buf_size))
                self._marks[q] = ring.head
        for ring in rx + tx:
            if ring.valid():
                n = ring.len * 16
                parts.append(np.arange(ring.base, ring.base + n, 4096, dtype=np.uint64))
                parts.append(np.array([ring.base + n - 1], dtype=np.uint64))
        if not parts:
            return np.zeros(0, np.int64)
        return gpa_pages_to_ram(iommu, np.concatenate(parts))
