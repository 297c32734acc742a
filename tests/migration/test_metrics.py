"""The measuring pieces of MigrationStats, without a VM."""

from __future__ import annotations

import pytest

from vmferry.migration.metrics import BandwidthWindow, MigrationStats, RoundRecord


def test_bandwidth_window_updates_every_100_ms_not_per_batch() -> None:
    w = BandwidthWindow()
    w.start(10.0)
    assert not w.add(1_000_000, 10.04)  # within the window: the rate stays
    assert w.rate == 0.0
    assert w.add(1_000_000, 10.125)
    assert w.rate == pytest.approx(2_000_000 / 0.125)
    assert not w.add(500_000, 10.2)
    assert w.add(500_000, 10.5)  # a long batch: its whole time counts
    assert w.rate == pytest.approx(1_000_000 / 0.375)


def test_bandwidth_window_starts_on_first_bytes_when_not_started() -> None:
    w = BandwidthWindow(window_s=1.0)
    assert not w.add(10, 5.0)
    assert w.add(90, 6.0) and w.rate == pytest.approx(100.0)


def test_snapshot_shares_nothing_mutable() -> None:
    st = MigrationStats(status="active", devices=[{"name": "vgpu0"}])
    snap = st.snapshot()
    st.rounds.append(RoundRecord(0, 0.0, 1.0, 1, 0, 4096, 0, 0.0, 0.0))
    st.verify.mismatched_pages.append(7)
    st.downtime.total_ms = 5.0
    st.devices[0]["name"] = "changed"
    assert snap.rounds == [] and snap.verify.mismatched_pages == []
    assert snap.downtime.total_ms == 0.0 and snap.devices == [{"name": "vgpu0"}]
