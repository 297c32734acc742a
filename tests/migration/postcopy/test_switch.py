"""migrate-start-postcopy's checks (one line each), the round's decision once the switch
is wanted, and the source table's post-copy walk: switch, hand-over, pages, audit."""

from __future__ import annotations

import pytest

from tests.migration.tables import put_at, shortest_paths, steps
from vmferry.migration.postcopy.switch import SwitchWish, decision, refusal
from vmferry.migration.source_machine import (
    POSTCOPY,
    RELEASED,
    TABLES,
    SourceAction,
    SourceEvent,
    SourceMachine,
    SourceState,
    Target,
)
from vmferry.migration.status import MigrationStatus

St, Ev, Ac = SourceState, SourceEvent, SourceAction
PATHS = shortest_paths(TABLES[Target.LIVE], St.IDLE)


def _why(state: SourceState, **kw: object) -> str | None:
    args: dict[str, object] = {
        "postcopy_ram": True,
        "live": True,
        "verify_mode": "on",
        "requested": False,
    }
    args.update(kw)
    return refusal(state, **args)  # type: ignore[arg-type]


def test_the_switch_may_be_asked_for_before_and_during_the_rounds() -> None:
    for state in (St.SETUP, St.AWAIT_ACCEPTED, St.PRECOPY):
        assert _why(state) is None
        assert _why(state, verify_mode="off") is None


@pytest.mark.parametrize(
    ("state", "kw", "line"),
    [
        (St.PRECOPY, {"postcopy_ram": False}, "the postcopy-ram capability is not set"),
        (St.PRECOPY, {"live": False}, "a migration to a file cannot switch to post-copy"),
        (St.PRECOPY, {"verify_mode": "strict"}, "x-verify strict checks all of RAM"),
        (St.IDLE, {}, "the migration has not been started"),
        (St.PRECOPY, {"requested": True}, "the migration is already in post-copy"),
        (St.POSTCOPY_ACTIVE, {}, "the migration is already in post-copy"),
        (St.COMPLETED, {}, "the migration has already completed"),
        (St.FAILED, {}, "the migration has already failed"),
        (St.CANCELLED, {}, "the migration has already been cancelled"),
        (St.CANCELLING, {}, "the migration is being cancelled"),
        (St.STOP_COPY, {}, "the migration is already switching over"),
    ],
)
def test_each_refusal_is_one_line_naming_the_command(
    state: SourceState, kw: dict[str, object], line: str
) -> None:
    why = _why(state, **kw)
    assert why is not None and why.startswith(f"migrate-start-postcopy: {line}")
    assert "\n" not in why


def test_the_capability_is_checked_first() -> None:
    why = _why(St.COMPLETED, postcopy_ram=False)
    assert why == "migrate-start-postcopy: the postcopy-ram capability is not set"


def test_an_asked_switch_comes_at_the_rounds_end_a_due_one_not_after_convergence() -> None:
    actions = ("continue", "cancel", "switchover")
    assert [decision(a, requested=True, due=False) for a in actions] == ["postcopy"] * 3
    assert [decision(a, requested=False, due=True) for a in actions] == [
        "postcopy",
        "postcopy",
        "switchover",  # converged: pre-copy finishes it
    ]
    assert [decision(a, requested=False, due=False) for a in actions] == list(actions)


def test_a_postcopy_migration_walks_switch_hand_over_pages_audit() -> None:
    m = put_at(SourceMachine(Target.LIVE), PATHS[St.PRECOPY])
    actions = steps(m, Ev.ROUND_POSTCOPY)
    assert Ac.SEND_FINAL_ROUND not in actions  # no final RAM round: the pages come later
    assert actions.index(Ac.SEND_OWED) < actions.index(Ac.END_STREAM)
    # QEMU 7.2: postcopy-active from the switch on, though the VM is paused for it.
    assert m.status is MigrationStatus.POSTCOPY_ACTIVE and m.postcopy and not m.released
    steps(m, Ev.STREAM_ENDED)
    assert steps(m, Ev.READY) == [
        Ac.SEND_GO,
        Ac.STOP_DIRTY_TRACKING,
        Ac.SERVE_PAGES,
        Ac.AWAIT_RESUMED,
    ]
    assert m.released  # "go" is out: never back here on its own
    steps(m, Ev.RESUMED_UNAUDITED)
    assert m.status is MigrationStatus.POSTCOPY_ACTIVE
    assert steps(m, Ev.PAGES_LANDED_UNAUDITED) == [Ac.SEND_AUDIT, Ac.AWAIT_AUDITED]
    assert m.status is MigrationStatus.POSTCOPY_ACTIVE
    assert steps(m, Ev.AUDIT_PASSED) == [Ac.REPORT_STATUS, Ac.RELEASE_DEVICES]
    assert m.state is St.COMPLETED


def test_a_destination_lost_after_go_loses_the_vm_and_nothing_rolls_back() -> None:
    for state in (St.POSTCOPY_HANDING_OVER, St.POSTCOPY_ACTIVE, St.POSTCOPY_AUDITING):
        for event in (Ev.PEER_CLOSED, Ev.PEER_SILENT, Ev.ERROR):
            m = put_at(SourceMachine(Target.LIVE), PATHS[state])
            assert steps(m, event) == [Ac.REPORT_STATUS]
            assert m.state is St.FAILED_AFTER_RELEASE and m.status is MigrationStatus.FAILED
        m = put_at(SourceMachine(Target.LIVE), PATHS[state])
        assert steps(m, Ev.CANCEL) == [] and m.state is state  # too late


def test_before_go_a_failed_switch_rolls_back_as_a_stop_copy_does() -> None:
    m = put_at(SourceMachine(Target.LIVE), PATHS[St.POSTCOPY_SWITCH])
    assert steps(m, Ev.ERROR) == [Ac.TELL_ABORT, Ac.ROLLBACK, Ac.REPORT_STATUS]
    m = put_at(SourceMachine(Target.LIVE), PATHS[St.POSTCOPY_AWAIT_READY])
    assert steps(m, Ev.PEER_CLOSED) == [Ac.ROLLBACK, Ac.REPORT_STATUS]
    assert {
        St.POSTCOPY_HANDING_OVER,
        St.POSTCOPY_ACTIVE,
        St.POSTCOPY_AUDITING,
        St.POSTCOPY_PAUSED,
    } == POSTCOPY & RELEASED


def test_the_switch_is_wanted_when_asked_for_or_due_and_only_where_allowed() -> None:
    wish = SwitchWish("2,30s", allowed=True)
    assert wish.decide("continue", 1, 1.0) == "continue"
    assert wish.decide("continue", 2, 1.0) == wish.decide("cancel", 1, 30.0) == "postcopy"
    assert wish.decide("switchover", 2, 1.0) == "switchover"
    assert wish.reason(2, 1.0).startswith("switched to post-copy: not converged after 2 rounds")
    wish.requested = True
    assert wish.decide("switchover", 0, 0.0) == "postcopy"
    refused = SwitchWish("1", allowed=False)
    refused.requested = True
    assert refused.decide("continue", 5, 100.0) == "continue"
    never = SwitchWish("", allowed=True)
    assert never.decide("continue", 1000, 1e6) == "continue"
    never.requested = True
    assert never.decide("continue", 1, 0.1) == "postcopy"
    assert "migrate-start-postcopy" in never.reason(1, 0.1)
