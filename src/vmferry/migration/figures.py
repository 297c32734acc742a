"""A source's live figures: what query-migrate shows while the migration runs.

The migration's threads (the driver, one per channel) write the figures and QMP copies
them (``snapshot``), so every compound update holds ``lock``. Figures move per batch,
not only at round ends, as QEMU's do every 100 ms.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration import policy
from vmferry.migration.metrics import BandwidthWindow, MigrationStats, RoundRecord
from vmferry.migration.ram import RamStats
from vmferry.migration.status import MigrationStatus


class LiveFigures:
    """The stats of one outgoing migration and the lock that guards them."""

    def __init__(self, total_ram: int) -> None:
        self.stats = MigrationStats(status=MigrationStatus.SETUP, total_ram=total_ram)
        self.lock = threading.Lock()
        self.t0 = 0.0  # when the migration started (monotonic); 0 before
        self._window = BandwidthWindow()
        self._device_pending = 0  # device bytes left at the last sync, for expected downtime
        self._decision: policy.Decision | None = None  # the last one: its window's costs

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.t0) * 1e3

    def snapshot(self, running: bool) -> MigrationStats:
        """A copy safe to read while the migration runs; total-time counts up while it
        runs, as QEMU's does."""
        with self.lock:
            snap = self.stats.snapshot()
        if running and self.t0:
            snap.total_ms = self.elapsed_ms()
        return snap

    def sending(self, npages: int) -> None:
        """A round (or the stop-and-copy) starts sending ``npages`` pages."""
        with self.lock:
            # QEMU's "remaining": what this round still has to send, falling as it goes.
            self.stats.remaining = npages * PAGE_SIZE
            self._window.start(time.monotonic())

    def batch_sent(self, batch: RamStats) -> None:
        """One batch is out (on any channel's thread)."""
        now = time.monotonic()
        with self.lock:
            st = self.stats
            st.transferred += batch.bytes
            st.normal += batch.normal
            st.duplicate += batch.zero
            st.remaining = max(0, st.remaining - (batch.normal + batch.zero) * PAGE_SIZE)
            if st.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
                st.precopy_bytes += batch.bytes  # as it goes out, as QEMU counts it
            if self._window.add(batch.bytes, now):
                st.mbps = self._window.rate * 8 / 1e6
                if st.status == MigrationStatus.ACTIVE:  # the switchover keeps its estimate
                    # Device state goes in the downtime too (as the last decision saw it),
                    # and the window's other costs as the policy weighed them.
                    last = self._decision or policy.Decision("continue", "", 0.0)
                    st.expected_downtime_ms = last.expected_at(
                        st.remaining, self._device_pending, self._window.rate
                    )

    def synced(self) -> None:
        """The dirty log was read once more (QEMU's dirty-sync-count)."""
        with self.lock:
            self.stats.dirty_sync_count += 1

    def round_ended(self, record: RoundRecord, devices: list[dict[str, object]]) -> None:
        with self.lock:
            st = self.stats
            st.devices = devices
            st.rounds.append(record)
            st.dirty_pages_rate = record.dirty_rate / PAGE_SIZE
            st.mbps = record.bandwidth * 8 / 1e6
            if not record.stop_copy:
                st.precopy_bytes += record.device_bytes  # RAM was counted per batch

    def decided(
        self,
        remaining: int,
        decision: policy.Decision,
        device_pending: int,
        device_transferred: int,
    ) -> None:
        """What the policy saw and said at a round's end."""
        with self.lock:
            st = self.stats
            st.remaining = remaining
            st.expected_downtime_ms = decision.expected_downtime_ms
            st.convergence = decision.reason
            st.device_transferred = device_transferred
            self._device_pending = device_pending
            self._decision = decision

    def throttled(self, pct: int) -> None:
        with self.lock:
            self.stats.throttle_pct = pct

    def failed(self, message: str) -> None:
        with self.lock:
            self.stats.error = message

    def verify_passed(self, pages_checked: int) -> None:
        with self.lock:
            v = self.stats.verify
            v.status = v.cpu_state = "passed"
            v.pages_checked = pages_checked

    def verify_failed(self, found: dict[str, Any]) -> None:
        """What the destination's check found, when it refused the VM for it."""
        with self.lock:
            v = self.stats.verify
            v.status = "failed"
            v.cpu_state = str(found.get("cpu_state", "off"))
            v.pages_checked = int(found.get("pages_checked", 0))
            v.mismatched_pages = [int(p) for p in found.get("mismatched_pages", [])]
            v.detail = str(found.get("detail", ""))

    def ended(self) -> None:
        with self.lock:
            self.stats.total_ms = self.elapsed_ms()


__all__ = ["LiveFigures"]
