"""`vmferry migrate`'s progress view and summary, rendered as a terminal would show them."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, RenderableType

from vmferry.cli.migrate_view import progress as _progress
from vmferry.cli.migrate_view import summary as _summary

ACTIVE = {
    "status": "active",
    "expected-downtime": 123,
    "ram": {
        "transferred": 123_456_789,
        "remaining": 98_765_432,
        "dirty-sync-count": 3,
        "mbps": 2345.6,
        "dirty-pages-rate": 12_345,
    },
    "vfio": {"transferred": 1_234_567},
}


def render(thing: RenderableType, width: int = 80) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(thing)
    return out.getvalue().splitlines()


def summary(rep: dict[str, Any]) -> list[str]:
    out = io.StringIO()
    _summary(Console(file=out, width=120, color_system=None), rep)
    return out.getvalue().splitlines()


def test_progress_in_80_columns_has_the_bar_on_its_own_line() -> None:
    lines = render(_progress(ACTIVE))
    assert set(lines[0].strip()) <= set("━╺╸ "), lines[0]
    assert lines[1].split() == ["status", "active", "sync", "rounds", "3"], lines
    assert all(len(line) <= 80 for line in lines)
    assert any(line.split()[:2] == ["expected", "downtime"] for line in lines)


def test_progress_shows_every_status_whole() -> None:
    for status in ("setup", "active", "device", "completed", "cancelled"):
        lines = render(_progress({**ACTIVE, "status": status}))
        assert lines[1].split()[:2] == ["status", status], lines


def row(lines: list[str], name: str) -> str:
    for line in lines:
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == name:
            return cells[1]
    raise AssertionError(f"no row {name!r} in {lines}")


def test_summary_of_a_failed_verification_names_the_pages() -> None:
    rep = {
        "status": "failed",
        "downtime": 312,
        "verify": {
            "status": "failed",
            "pages-checked": 65_536,
            "first-mismatches": [32_768, 32_770],
            "cpu-state": "passed",
        },
        "error-desc": "the destination refused the VM: verification failed: …",
    }
    lines = summary(rep)
    assert "migration failed" in lines[0]
    assert row(lines, "verification") == "failed in pages 32768, 32770 (65536 pages checked)"
    assert row(lines, "downtime") == "312 ms"


def test_summary_of_a_file_says_verification_is_deferred() -> None:
    rep = {
        "status": "completed",
        "verify": {"status": "deferred", "detail": "checked on restore", "pages-checked": 9},
    }
    assert row(summary(rep), "verification") == "deferred: checked on restore"


def test_summary_of_a_failed_migration_says_verification_was_not_reached() -> None:
    rep = {
        "status": "failed",
        "verify": {"status": "off", "pages-checked": 0},
        "capabilities": {"x-verify": True},
    }
    assert row(summary(rep), "verification") == "not reached (the migration failed before it)"
    off = {**rep, "capabilities": {"x-verify": False}}
    assert row(summary(off), "verification") == "off"  # --no-verify: it really was off


def test_summary_of_an_audited_migration_gives_both_phases() -> None:
    rep = {
        "status": "completed",
        "verify": {
            "status": "passed",
            "pages-checked": 210,
            "mode": "on",
            "phases": {
                "pre-resume": {"pages": 210, "ms": 9.66, "status": "passed"},
                "audit": {"pages": 262_144, "ms": 243.9, "source_ms": 210.6, "status": "passed"},
            },
        },
        "capabilities": {"x-verify": True},
    }
    assert row(summary(rep), "verification") == (
        "passed (210 pages before resume in 9.7 ms, 262144 audited after resume in 243.9 ms)"
    )
    off = {"status": "failed", "verify": {"status": "off"}, "capabilities": {"x-verify": True}}
    off["parameters"] = {"x-verify": "off"}
    assert row(summary(off), "verification") == "off"  # --verify off: it really was off


def test_downtime_parts_add_up_to_the_total_after_a_failed_switchover() -> None:
    rep = {
        "status": "failed",
        "downtime": 4664,
        "downtime-breakdown": {
            "pause": 3.2,
            "final-ram": 0.0,
            "cpu-state": 0.0,
            "device-state": 0.0,
            "verify": 0.0,
            "resume": 0.0,
            "total": 4663.9,
        },
    }
    lines = summary(rep)
    assert row(lines, "downtime: pause") == "3.2 ms"
    assert row(lines, "downtime: waiting for the destination, until the failure") == "4660.7 ms"
    assert row(lines, "downtime: total") == "4663.9 ms"


def test_summary_counts_sync_rounds_as_the_progress_view_does() -> None:
    rep = {
        "status": "completed",
        "ram": {**ACTIVE["ram"], "transferred": 300 << 20},  # type: ignore[dict-item]
        "total-time": 2000,
        "rounds": [{"bandwidth": 100 << 20}, {"bandwidth": 200 << 20, "stop-copy": True}],
        # 0.4 ms of bookkeeping besides the parts: no row of its own
        "downtime-breakdown": {"pause": 0.3, "device-state": 0.004, "verify": 24.4, "total": 25.1},
    }
    lines = summary(rep)
    progress = render(_progress(ACTIVE))
    assert progress[1].split()[-1] == row(lines, "sync rounds") == "3"
    # One unit (MiB/s) and each figure says what it is an average of.
    assert row(lines, "average bandwidth") == "150 MiB/s over the whole migration"
    assert row(lines, "stop-and-copy bandwidth") == "200 MiB/s"
    downtime = [line for line in lines if "downtime:" in line]
    assert [row(lines, k) for k in ("downtime: pause", "downtime: verify")] == ["0.3 ms", "24.4 ms"]
    assert len(downtime) == 3 and row(lines, "downtime: total") == "25.1 ms", downtime
    assert any(line.split()[:4] == ["bandwidth", "now", "280", "MiB/s"] for line in progress)
