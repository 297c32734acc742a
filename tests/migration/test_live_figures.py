"""What query-migrate and the report say about real migrations: figures that move while a
round is sent, that stay after a failure or a cancel, a failed verification reported as
such, and the same number of rounds on both sides."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from tests.migration.live import (
    Destination,
    Events,
    Guest,
    Workload,
    assert_source_intact,
    reference_result,
    start_migration,
    wait_migration,
    wait_until,
)
from vmferry.cli.migrate_view import summary as _summary
from vmferry.controller import VmController
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration import report
from vmferry.migration.params import MigrationCapabilities, MigrationParameters

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

WORKLOAD = Workload(wss="32M", seed=13, rounds=16, rate=64)  # about 8 s
UNTRACKED_PAGE = (128 << 20) // PAGE_SIZE  # beyond memtouch's working set


@pytest.fixture
def guest() -> Iterator[Guest]:
    reference_result(WORKLOAD)
    g = Guest(WORKLOAD)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def dest() -> Iterator[Destination]:
    d = Destination()
    try:
        yield d
    finally:
        d.close()


def summary_text(rep: dict[str, Any]) -> str:
    out = io.StringIO()
    _summary(Console(file=out, width=100, color_system=None), rep)
    return out.getvalue()


def test_figures_move_during_a_round_and_stay_after_a_cancel(
    guest: Guest, dest: Destination
) -> None:
    """At 16 MB/s round 0 (the whole working set) takes seconds: query-migrate must show
    it going out, not zeros until the round ends; after migrate_cancel every figure is
    kept and the reason is in words."""
    ctl = VmController(guest.machine)
    ctl.migrate_set_parameters({"max-bandwidth": 16_000_000})
    ctl.migrate(dest.uri)
    seen: list[dict[str, Any]] = []

    def round0_seen_enough() -> bool:
        q = ctl.query_migrate()
        ram = q.get("ram", {})
        if q.get("status") == "active" and ram["dirty-sync-count"] == 0 and ram["transferred"]:
            seen.append(q)
        return len({q["ram"]["transferred"] for q in seen}) >= 4

    wait_until(round0_seen_enough, 20, "round 0 to show progress")
    assert ctl.query_migrate()["ram"]["dirty-sync-count"] == 0, "round 0 ended too soon"
    last = seen[-1]
    assert last["total-time"] > seen[0]["total-time"] > 0
    assert last["ram"]["mbps"] > 0
    assert last["ram"]["precopy-bytes"] > seen[0]["ram"]["precopy-bytes"] > 0
    assert last["ram"]["remaining"] < seen[0]["ram"]["remaining"]
    assert last["expected-downtime"] > 0
    transferred = [q["ram"]["transferred"] for q in seen]
    assert transferred == sorted(transferred)
    ctl.migrate_cancel()
    assert ctl.migration is not None
    wait_migration(ctl.migration)
    q = ctl.query_migrate()
    assert q["status"] == "cancelled" and q["error-desc"] == "cancelled by the user"
    assert q["ram"]["transferred"] >= last["ram"]["transferred"]
    assert q["total-time"] >= last["total-time"] and q["setup-time"] >= 0
    dest.failure(30)
    assert_source_intact(guest)


def test_failed_verification_is_reported_with_pages_and_pause(
    guest: Guest, dest: Destination
) -> None:
    """An untracked write while the VM is paused for the switchover: the report and the
    summary say verification failed, name the page, and give the real pause time."""

    def dma_at_switchover(name: str, data: dict[str, Any]) -> None:
        if data.get("status") == "device":
            guest.machine.memory.pages()[UNTRACKED_PAGE, 0] = 0x5EED

    src = start_migration(guest, dest.uri, events=Events(hook=dma_at_switchover))
    wait_migration(src)
    dest.failure()
    st = src.snapshot()
    assert st.status == "failed", st.error
    assert st.verify.status == "failed" and st.verify.mismatched_pages == [UNTRACKED_PAGE]
    assert st.verify.pages_checked >= (32 << 20) // PAGE_SIZE  # the working set at least
    assert st.downtime_ms > 0
    rep = report.report_dict(st, src.params, src.caps)
    assert rep["verify"]["status"] == "failed"
    assert rep["verify"]["first-mismatches"] == [UNTRACKED_PAGE]
    assert rep["downtime"] == round(st.downtime_ms) > 0
    assert report.query_migrate_dict(st)["downtime"] == rep["downtime"]
    text = summary_text(rep)
    assert "migration failed" in text and f"pages {UNTRACKED_PAGE}" in text, text
    assert_source_intact(guest)


def test_both_sides_count_the_same_rounds(guest: Guest, dest: Destination) -> None:
    src = start_migration(guest, dest.uri)
    wait_migration(src)
    assert src.stats.status == "completed", src.stats.error
    incoming, result = dest.finish()
    assert result == reference_result(WORKLOAD)
    assert incoming.rounds == len(src.stats.rounds) >= 2
    q = report.query_migrate_dict(src.snapshot())
    assert q["ram"]["remaining"] == 0


def test_migrate_to_file_says_verification_is_deferred(guest: Guest, tmp_path: Any) -> None:
    path = tmp_path / "vm.state"
    src = start_migration(
        guest, f"file:{path}", MigrationParameters(), MigrationCapabilities(x_verify=True)
    )
    wait_migration(src)
    st = src.snapshot()
    assert st.status == "completed", st.error
    assert st.verify.status == "deferred" and st.verify.pages_checked > 0
    assert report.query_migrate_dict(st)["ram"]["remaining"] == 0
    text = summary_text(report.report_dict(st, src.params, src.caps))
    assert "verification off" not in text and "deferred" in text, text
