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


# Buffers fetched between two reports that the mediator lists one by one; past this it
# reports every page the VF can reach instead (correct, as ``none`` is), so a VF that runs
# on after a failed migration, its reports ended, keeps no growing list.
FETCH_LIMIT = 1 << 16


class RxMediator:
    """``mediated`` tracking: pages RX DMA wrote or may write since the last report.

    Each report covers, per RX ring, the buffers that were posted at the last report
    (the device may have written them right after it), every buffer fetched at a
    doorbell since (however often the ring went round meanwhile), and those posted now
    (the device may write them any time, even right after this report) — plus every
    ring's descriptor pages, which the device writes back. The caller holds the device's
    lock, so no DMA moves a head meanwhile. The first report covers every slot: anything
    the ring ever had posted may have been written since tracking began.
    """

    def __init__(self) -> None:
        self._posted: dict[int, npt.NDArray[np.uint64]] = {}  # per queue, at the last report
        self._fetched: list[npt.NDArray[np.uint64]] = []
        self._fetched_slots = 0
        self._tracking = False  # a first report was taken: doorbells are recorded
        self._overflow = False

    @staticmethod
    def _spans(ring: Ring, slots: npt.NDArray[np.int64], buf_size: int) -> npt.NDArray[np.uint64]:
        """Addresses in every 4 KiB page of the buffers posted in ``slots``."""
        if not slots.size or not ring.posted.size:
            return np.zeros(0, np.uint64)
        addrs = ring.posted[slots]
        addrs = addrs[addrs != 0]
        steps = np.arange(0, buf_size + 4096, 4096, dtype=np.uint64)
        ends = addrs + np.uint64(max(buf_size, 1) - 1)
        spans = np.minimum(addrs[:, None] + steps[None, :], ends[:, None])
        return np.asarray(spans.ravel(), dtype=np.uint64)

    def fetched(self, ring: Ring, slots: npt.NDArray[np.int64], buf_size: int) -> None:
        """The doorbell fetched ``slots``: their buffers may be written before the next
        report, and posted again by then (a ring can go round between two reports)."""
        if not self._tracking or self._overflow or not slots.size:
            return
        self._fetched_slots += int(slots.size)
        if self._fetched_slots > FETCH_LIMIT:
            self._overflow, self._fetched = True, []
            return
        self._fetched.append(self._spans(ring, slots, buf_size))

    def queue_reset(self, q: int, ring: Ring, buf_size: int) -> None:
        """A queue is disabled: what it had posted may have been written; keep it."""
        if self._tracking and not self._overflow:
            self._fetched.append(self._spans(ring, ring.slots(ring.head, ring.tail), buf_size))

    def report(
        self, iommu: Iommu, rx: list[Ring], tx: list[Ring], buf_size: int
    ) -> npt.NDArray[np.int64]:
        parts, self._fetched, self._fetched_slots = self._fetched, [], 0
        overflow, self._overflow = self._overflow, False
        first, self._tracking = not self._tracking, True
        for q, ring in enumerate(rx):
            if not ring.len:
                continue
            if first:
                parts.append(self._spans(ring, np.arange(ring.len, dtype=np.int64), buf_size))
            elif q in self._posted:
                parts.append(self._posted[q])
            now = self._spans(ring, ring.slots(ring.head, ring.tail), buf_size)
            parts.append(now)
            self._posted[q] = now
        for ring in rx + tx:
            if ring.valid():
                n = ring.len * 16
                parts.append(np.arange(ring.base, ring.base + n, 4096, dtype=np.uint64))
                parts.append(np.array([ring.base + n - 1], dtype=np.uint64))
        if overflow:  # too many doorbells to list: everything the VF can reach
            return iommu.mapped_pages()
        if not parts:
            return np.zeros(0, np.int64)
        return gpa_pages_to_ram(iommu, np.concatenate(parts))
