"""query-migrate and the report under QEMU's names and types; the timeline PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vmferry.cli.migrate_view import verification as _verification
from vmferry.migration.metrics import (
    DowntimeBreakdown,
    MigrationStats,
    RoundRecord,
    VerifyResult,
)
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.plot import plot_timeline
from vmferry.migration.report import (
    NOT_REACHED,
    query_migrate_dict,
    report_dict,
    stats_from_report,
    verify_status,
    write_report,
)

MIB = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RAM_FIELDS: dict[str, type | tuple[type, ...]] = {
    "transferred": int,
    "remaining": int,
    "total": int,
    "duplicate": int,
    "normal": int,
    "normal-bytes": int,
    "dirty-pages-rate": int,
    "mbps": (int, float),
    "dirty-sync-count": int,
    "precopy-bytes": int,
    "downtime-bytes": int,
    "postcopy-requests": int,
    "postcopy-bytes": int,
    "page-size": int,
}


def _rounds(n: int, stop_copy: bool = True) -> list[RoundRecord]:
    out = []
    t = 0.0
    for i in range(n):
        last = stop_copy and i == n - 1
        duration = 0.08 if last else (2.0 if i == 0 else 0.5)
        out.append(
            RoundRecord(
                index=i,
                start_s=t,
                duration_s=duration,
                pages=(1 << 18) if i == 0 else 20_000 // (i + 1),
                zero_pages=1000 if i == 0 else 10,
                bytes=(1 << 30) if i == 0 else (80 * MIB) // (i + 1),
                dirty_pages=20_000 // (i + 2),
                dirty_rate=150.0 * MIB,
                bandwidth=500.0 * MIB,
                throttle_pct=20 if i >= 3 else 0,
                stop_copy=last,
            )
        )
        t += duration
    return out


def completed_stats(n_rounds: int = 6) -> MigrationStats:
    return MigrationStats(
        status="completed",
        total_ram=1 << 30,
        transferred=1_300 * MIB,
        duplicate=1040,
        normal=300_000,
        remaining=0,
        dirty_sync_count=n_rounds,
        dirty_pages_rate=12_345.6,
        mbps=4000.5,
        precopy_bytes=1_290 * MIB,
        downtime_bytes=10 * MIB,
        setup_ms=12.4,
        total_ms=4_567.8,
        downtime_ms=123.4,
        expected_downtime_ms=110.0,
        throttle_pct=20,
        rounds=_rounds(n_rounds),
        downtime=DowntimeBreakdown(
            pause_ms=0.4,
            final_ram_ms=60.1,
            cpu_state_ms=3.2,
            device_state_ms=0.0,
            verify_ms=40.0,
            resume_ms=19.7,
            total_ms=123.4,
        ),
        verify=VerifyResult(status="passed", pages_checked=262_144, cpu_state="passed"),
        convergence="converged: pending 40 MiB ≤ threshold 150 MiB (bandwidth 500 MiB/s × 300 ms)",
    )


def failed_stats() -> MigrationStats:
    return MigrationStats(
        status="failed",
        total_ram=1 << 30,
        transferred=700 * MIB,
        total_ms=3_000.0,
        expected_downtime_ms=math.inf,
        rounds=_rounds(3, stop_copy=False),
        verify=VerifyResult(status="off"),
        error="destination closed the connection in section RAM at offset 734003200",
        convergence="pending 812 MiB > threshold 96 MiB (bandwidth 320 MiB/s × 300 ms)",
    )


def test_report_has_every_qemu_field_with_its_type() -> None:
    r = report_dict(completed_stats(), MigrationParameters(), MigrationCapabilities())
    for name in ("total-time", "downtime", "expected-downtime", "setup-time"):
        assert type(r[name]) is int, name
    assert r["status"] == "completed"
    assert r["total-time"] == 4568 and r["downtime"] == 123 and r["setup-time"] == 12
    assert set(r["ram"]) == set(RAM_FIELDS)
    for name, t in RAM_FIELDS.items():
        assert isinstance(r["ram"][name], t) and not isinstance(r["ram"][name], bool), name
    assert r["ram"]["normal-bytes"] == 300_000 * 4096
    assert r["ram"]["page-size"] == 4096
    assert r["ram"]["dirty-pages-rate"] == 12_346
    assert "error-desc" not in r


def test_report_vmferry_sections() -> None:
    stats = completed_stats()
    r = report_dict(stats, MigrationParameters(), MigrationCapabilities(auto_converge=True))
    assert r["downtime-breakdown"] == {
        "pause": 0.4,
        "final-ram": 60.1,
        "cpu-state": 3.2,
        "device-state": 0.0,
        "verify": 40.0,
        "resume": 19.7,
        "total": 123.4,
    }
    assert len(r["rounds"]) == 6
    keys = {"index", "start", "duration", "pages", "zero-pages", "bytes", "dirty-pages"}
    keys |= {"dirty-rate", "bandwidth", "throttle", "stop-copy", "device-bytes"}
    assert all(set(x) == keys for x in r["rounds"])
    assert r["rounds"][-1]["stop-copy"] is True and r["rounds"][0]["stop-copy"] is False
    assert r["verify"] == {
        "status": "passed",
        "pages-checked": 262_144,
        "first-mismatches": [],
        "cpu-state": "passed",
        "detail": "",
        "mode": "off",
        "phases": {},
    }
    assert r["parameters"]["downtime-limit"] == 300
    assert r["capabilities"]["auto-converge"] is True
    assert r["convergence"].startswith("converged")


def test_report_failed_has_error_desc_and_valid_json(tmp_path: Path) -> None:
    stats = failed_stats()
    r = report_dict(stats, MigrationParameters(), MigrationCapabilities())
    assert r["error-desc"] == stats.error
    assert r["expected-downtime"] == -1  # infinite: JSON has no infinity
    path = tmp_path / "report.json"
    write_report(path, stats, MigrationParameters(), MigrationCapabilities())
    text = path.read_text()
    assert text.startswith('{\n  "status": "failed"')
    assert json.loads(text) == r


def test_query_migrate_completed() -> None:
    q = query_migrate_dict(completed_stats())
    assert set(q) == {"status", "setup-time", "total-time", "downtime", "ram", "vfio"}
    assert q["downtime"] == 123


def test_query_migrate_active() -> None:
    stats = completed_stats()
    stats.status = "active"
    stats.remaining = 40 * MIB
    q = query_migrate_dict(stats)
    assert set(q) == {
        "status",
        "setup-time",
        "total-time",
        "expected-downtime",
        "ram",
        "vfio",
        "cpu-throttle-percentage",
    }
    assert q["expected-downtime"] == 110 and q["ram"]["remaining"] == 40 * MIB


def test_query_migrate_status_only_in_setup() -> None:
    stats = completed_stats()
    stats.status = "setup"
    assert query_migrate_dict(stats) == {"status": "setup"}


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_query_migrate_keeps_every_figure_after_the_end(status: str) -> None:
    """How far it got is what a client wants to see when a migration failed or was
    cancelled (QEMU 7.2 drops all but status and error-desc)."""
    stats = failed_stats()
    stats.status = status
    q = query_migrate_dict(stats)
    assert q["status"] == status and q["error-desc"] == stats.error
    assert q["total-time"] == 3000 and q["ram"]["transferred"] == 700 * MIB
    assert q["expected-downtime"] == -1 and "downtime" not in q  # never paused
    assert q["vfio"] == {"transferred": 0}
    stats.downtime_ms = 250.4  # it was paused for a switchover that failed
    q = query_migrate_dict(stats)
    assert q["downtime"] == 250 and "expected-downtime" not in q


def test_query_migrate_before_any_migration() -> None:
    assert query_migrate_dict(MigrationStats()) == {}


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000


@pytest.mark.parametrize(
    "stats",
    [
        completed_stats(1),
        completed_stats(6),
        completed_stats(120),
        failed_stats(),
        MigrationStats(),
    ],
    ids=["one-round", "six-rounds", "many-rounds", "failed", "empty"],
)
def test_plot_writes_a_png(tmp_path: Path, stats: MigrationStats) -> None:
    path = tmp_path / "timeline.png"
    plot_timeline(stats, path)
    _png(path)


def test_report_of_a_failure_before_switchover_says_verify_not_reached() -> None:
    r = report_dict(failed_stats(), MigrationParameters(), MigrationCapabilities(x_verify=True))
    assert r["verify"]["status"] == NOT_REACHED == "not-reached"
    assert stats_from_report(r).verify.status == NOT_REACHED
    off = report_dict(failed_stats(), MigrationParameters(), MigrationCapabilities(x_verify=False))
    assert off["verify"]["status"] == "off"  # --no-verify: it really was off


def test_report_and_summary_agree_on_verify_not_reached() -> None:
    r = report_dict(failed_stats(), MigrationParameters(), MigrationCapabilities(x_verify=True))
    assert _verification(r) == "not reached (the migration failed before it)"
    assert _verification(json.loads(json.dumps(r))) == _verification(r)


@pytest.mark.parametrize(
    ("migration", "status", "x_verify", "expected"),
    [
        ("failed", "off", True, NOT_REACHED),
        ("cancelled", "off", True, NOT_REACHED),
        ("failed", "off", False, "off"),
        ("completed", "off", True, "off"),
        ("completed", "passed", True, "passed"),
        ("failed", "failed", True, "failed"),
        ("completed", "deferred", True, "deferred"),
    ],
)
def test_verify_status(migration: str, status: str, x_verify: bool, expected: str) -> None:
    assert verify_status(migration, status, x_verify) == expected


def test_report_gives_each_verification_phase() -> None:
    stats = completed_stats()
    stats.verify.mode = "on"
    stats.verify.phases = {
        "pre-resume": {"pages": 120, "ms": 1.5, "status": "passed"},
        "audit": {"pages": 262_144, "ms": 80.0, "source_ms": 60.0, "status": "passed"},
    }
    r = report_dict(stats, MigrationParameters(), MigrationCapabilities())
    assert r["verify"]["mode"] == "on"
    assert r["verify"]["phases"]["audit"] == stats.verify.phases["audit"]
    assert r["parameters"]["x-verify"] == "on"


def test_query_migrate_names_the_verification_phase_while_the_source_is_held() -> None:
    stats = completed_stats()
    stats.status = "device"
    stats.verify.phase = "audit"  # the VM runs at the destination; the source waits
    assert query_migrate_dict(stats)["x-verify-phase"] == "audit"
    stats.verify.phase = ""
    assert "x-verify-phase" not in query_migrate_dict(stats)
