"""Pre-copy rounds: while the VM runs, each part sends what changed, the dirty logs are
synced, and the policy says go on, switch over, or give up.

Written against the Migratable contract only: RAM (on its multifd channels), the vCPUs
and the devices answer the same questions; the round never looks inside one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from vmferry.machine.machine import Machine
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.migration import policy
from vmferry.migration.codec import ROUND, RoundMarker
from vmferry.migration.devices import SourceDevices
from vmferry.migration.figures import LiveFigures
from vmferry.migration.metrics import RoundRecord
from vmferry.migration.migratable import Migratable
from vmferry.migration.multifd import MultifdRam
from vmferry.migration.params import MigrationCapabilities, MigrationParameters, verify_mode
from vmferry.migration.ram import RamStats
from vmferry.migration.reachable import reachable_bitmap, reachable_pages
from vmferry.migration.stream import StreamWriter
from vmferry.migration.vcpus import VcpuMigration
from vmferry.migration.verify import page_digests, pre_resume_set


@dataclass(frozen=True)
class Parts:
    """What migrates, each a Migratable; the main stream carries all but RAM's extra
    channels."""

    ram: MultifdRam
    vcpus: VcpuMigration
    devices: SourceDevices
    main: StreamWriter

    @property
    def all(self) -> tuple[Migratable, ...]:
        return (self.ram, self.vcpus, self.devices)

    def collect_dirty(self, npages: int, figures: LiveFigures) -> DirtyBitmap:
        """Every part's dirty pages since the last sync, scheduled for RAM's next save."""
        dirty = DirtyBitmap(npages)
        for part in self.all:
            part.collect_dirty(dirty)
        self.ram.schedule(dirty)
        figures.synced()
        return dirty

    def device_figures(self) -> list[dict[str, object]]:
        return [s.to_dict() for s in self.devices.stats]


class Precopy:
    """The rounds of one migration, numbered from 0 (round 0 sends all of RAM)."""

    def __init__(
        self,
        machine: Machine,
        parts: Parts,
        figures: LiveFigures,
        params: MigrationParameters,
        caps: MigrationCapabilities,
    ) -> None:
        self.machine = machine
        self.parts = parts
        self.figures = figures
        self.params = params
        self.caps = caps
        self.round_no = 0  # the round in flight
        self._bandwidths: list[float] = []
        self._throttle = policy.ThrottleState()
        # The check's costs, measured once per migration, when first needed.
        self._ms_per_page: float | None = None
        self._scan: ScanCost | None = None

    def start(self) -> None:
        """Dirty tracking on in every part: from here on every change is seen."""
        for part in self.parts.all:
            part.start_dirty_tracking()

    def round(self) -> policy.Decision:
        """Send one round, sync, and ask the policy; a "continue" throttles (auto-converge)
        and numbers the next round."""
        p = self.parts
        t_round = time.monotonic()
        p.ram.save_precopy(p.main)
        sent = RamStats(p.ram.last.normal, p.ram.last.zero, p.ram.last.bytes)
        dev_sent = sum(part.save_precopy(p.main) for part in (p.vcpus, p.devices))
        sent.bytes += dev_sent
        p.main.section(ROUND, [RoundMarker(self.round_no, sent.normal + sent.zero).encode()])
        t_sync = time.monotonic()
        dirty = p.collect_dirty(self.machine.memory.npages, self.figures)
        # The stop-and-copy syncs the dirty log once more, in series with the rest: as
        # long as this sync took.
        sync_ms = (time.monotonic() - t_sync) * 1e3
        dt = max(time.monotonic() - t_round, 1e-6)
        ndirty = dirty.count()
        record = RoundRecord(
            index=self.round_no,
            start_s=t_round - self.figures.t0,
            duration_s=dt,
            pages=sent.normal + sent.zero,
            zero_pages=sent.zero,
            bytes=sent.bytes,
            dirty_pages=ndirty,
            dirty_rate=p.ram.pending().bytes / dt,
            bandwidth=sent.bytes / dt,
            throttle_pct=self.machine.throttle_pct,
            device_bytes=dev_sent,
        )
        self.figures.round_ended(record, p.device_figures())
        decision = self._decide(record, sync_ms)
        if decision.action == "continue":
            self._throttle_for(sent.bytes)
            self.round_no += 1
        return decision

    def _decide(self, record: RoundRecord, sync_ms: float) -> policy.Decision:
        self._bandwidths.append(record.bandwidth)
        pending = self.parts.ram.pending().bytes
        devices = self.parts.devices.pending()
        # The stop-copy sends the vCPUs' state with the devices': it counts in the downtime.
        state = devices.bytes + self.parts.vcpus.pending().bytes
        decision = policy.decide(
            self.figures.elapsed_ms(),
            pending,
            # The stop-and-copy sends scattered dirty pages: judge it by the rounds that
            # did, not by round 0's bulk copy.
            policy.switchover_bandwidth(self._bandwidths, pending),
            record.dirty_rate,
            self.params,
            device_pending=state,
            throttle_pct=self._throttle.pct,
            # The stop-and-copy syncs once more, as long as this sync took; pausing,
            # resuming and the destination's confirmation cost about the same each time.
            overhead_ms=sync_ms + policy.PAUSE_RESUME_MS,
            # A device's initial data must be across first (REFERENCE §1).
            device_initial=devices.initial_bytes,
            verify=self._verify_cost(),
        )
        self.figures.decided(pending, decision, state, self.parts.devices.transferred)
        return decision

    def _verify_cost(self) -> policy.VerifyCost:
        """What the pre-resume check will cost (x-verify), as the stop-and-copy will pay
        it: the pages are counted afresh at each decision (cheap: a popcount of the
        residency bitmap), the costs per page and of the scan measured once, when first
        needed."""
        mode = verify_mode(self.params, self.caps)
        if mode == "off":
            return policy.NO_VERIFY
        counts = count_check(self.machine)
        if self._ms_per_page is None:
            self._ms_per_page = digest_ms_per_page()
        scan = ScanCost()
        # x-verify on finds the resident pages only where a device maps some.
        if mode == "strict" or counts.mapped > 0:
            if self._scan is None:
                self._scan = measure_scan(self.machine)
            scan = self._scan
        return policy.verify_cost(
            mode,
            counts.resident,
            counts.mapped,
            counts.reachable,
            self._ms_per_page,
            scan.scan_ms,
            scan.set_ms,
        )

    def _throttle_for(self, sent_bytes: int) -> None:
        pending = self.parts.ram.pending().bytes
        self._throttle = policy.next_throttle(
            self._throttle, pending, sent_bytes, self.params, self.caps.auto_converge
        )
        if self._throttle.pct != self.machine.throttle_pct:
            self.machine.set_throttle(self._throttle.pct)
            self.figures.throttled(self._throttle.pct)


@dataclass(frozen=True)
class CheckCounts:
    """The pre-resume check's page counts on this VM now."""

    resident: int  # pages holding data
    mapped: int  # pages some device's IOMMU maps
    reachable: int  # of those, the resident ones


def count_check(machine: Machine) -> CheckCounts:
    """Count what the check would digest, cheaply enough for every decision: the
    residency bitmap's popcount (0.3 ms at 8 GiB), ANDed with the devices' maps."""
    resident = machine.memory.resident_bitmap()
    if not machine.devices:
        return CheckCounts(resident.count(), 0, 0)
    mapped = reachable_bitmap(machine)
    reachable = int(np.bitwise_count(mapped.words & resident.words).sum())
    return CheckCounts(resident.count(), mapped.count(), reachable)


@dataclass(frozen=True)
class ScanCost:
    """What the stop-and-copy spends finding what to check, measured on this VM."""

    scan_ms: float = 0.0  # finding the resident pages (O(RAM))
    set_ms: float = 0.0  # building x-verify on's set of pages from them


def measure_scan(machine: Machine) -> ScanCost:
    """Time what the stop-and-copy does to set up the check, on this VM's RAM now: the
    resident pages, then x-verify on's set (with no final pages: those the policy counts
    as they shrink). DMA bypasses the dirty log, so the pages a device can reach are
    checked whatever the rounds sent."""
    t0 = time.perf_counter()
    resident = machine.memory.resident_pages()
    t1 = time.perf_counter()
    # The maps are looked up in the window too: timed with the set.
    pre_resume_set(np.zeros(0, dtype=np.int64), reachable_pages(machine), resident)
    t2 = time.perf_counter()
    return ScanCost((t1 - t0) * 1e3, (t2 - t1) * 1e3)


# 64 MiB: more than a last-level cache, so the digests read from memory as the check's
# do (a cache-warm 16 MiB buffer made them look cheaper), and a few tens of ms.
CALIBRATION_PAGES = 16384


def digest_ms_per_page() -> float:
    """What digesting one page costs here, as verification digests (two threads): the
    faster of two passes over CALIBRATION_PAGES pages of a scratch memfd of the guest
    RAM's kind, through verify's own page_digests (the calibration follows its function).
    Scratch memory, because finding resident guest pages costs O(RAM). The guest may run
    meanwhile, as it competes for the cores then too."""
    scratch = GuestMemory(CALIBRATION_PAGES * PAGE_SIZE, name="vmferry-digest-calibration")
    try:
        # Any data that is not zero: the digest's cost does not depend on it.
        words = scratch.bytes.view(np.uint64)
        words[:] = np.arange(words.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        pages = np.arange(CALIBRATION_PAGES, dtype=np.int64)
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            page_digests(scratch, pages, seed=1, threads=2)
            best = min(best, time.perf_counter() - t0)
        return best * 1e3 / CALIBRATION_PAGES
    finally:
        scratch.close()


__all__ = [
    "CheckCounts",
    "Parts",
    "Precopy",
    "ScanCost",
    "count_check",
    "digest_ms_per_page",
    "measure_scan",
]
