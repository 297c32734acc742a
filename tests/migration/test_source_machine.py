"""The source's table: every (state, event) pair of both targets, the real walks, the
status each state shows, and the rules the table must keep (cancelling, release)."""

from __future__ import annotations

import json
from typing import cast

import pytest

from tests.migration.tables import (
    assert_each_state_can_end,
    assert_steps_as_the_table_says,
    put_at,
    shortest_paths,
    steps,
)
from vmferry.errors import ConfigError, MigrationError
from vmferry.machine.machine import Machine
from vmferry.migration.codec import Accepted, Failed, decode_reply, encode_reply
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.migration.source_machine import (
    FINAL,
    RELEASED,
    ROLLBACK_AFTER_RELEASE,
    STATES,
    STATUS,
    TABLES,
    SourceAction,
    SourceEvent,
    SourceMachine,
    SourceState,
    Target,
    reply_event,
    round_ended,
)
from vmferry.migration.status import AFTER_CANCELLING, MigrationStatus, may_become
from vmferry.migration.table import UnexpectedEvent

St, Ev, Ac = SourceState, SourceEvent, SourceAction
CANCELLING = {St.CANCELLING_NO_PEER, St.CANCELLING, St.CANCELLING_AFTER_END}
# The actions after which the driver has the next event in hand (it waited or sent).
YIELDING = {
    Ac.CONNECT,
    Ac.AWAIT_ACCEPTED,
    Ac.SEND_ROUND,
    Ac.END_STREAM,
    Ac.AWAIT_READY,
    Ac.AWAIT_RESUMED,
    Ac.AWAIT_AUDITED,
    Ac.AWAIT_LANDED,
    Ac.AWAIT_RESUME,
}


PATHS = {t: shortest_paths(TABLES[t], St.IDLE) for t in Target}


def _at(target: Target, state: SourceState) -> SourceMachine:
    m = put_at(SourceMachine(target), PATHS[target][state])
    assert m.state is state
    return m


_walk = steps


ALL = [(t, s, e) for t in Target for s in sorted(STATES[t], key=lambda s: s.value) for e in Ev]


@pytest.mark.parametrize(
    ("target", "state", "event"), ALL, ids=[f"{t.value}-{s.name}-{e.name}" for t, s, e in ALL]
)
def test_every_pair_steps_as_the_table_says_or_is_refused_naming_both(
    target: Target, state: SourceState, event: SourceEvent
) -> None:
    assert_steps_as_the_table_says(_at(target, state), TABLES[target], STATUS, event)


@pytest.mark.parametrize("target", list(Target))
def test_each_target_reaches_exactly_its_states_and_each_can_end(target: Target) -> None:
    assert set(PATHS[target]) == STATES[target]
    assert_each_state_can_end(TABLES[target], STATES[target], FINAL)


@pytest.mark.parametrize("target", list(Target))
def test_status_is_reported_exactly_when_it_changes(target: Target) -> None:
    for (state, event), step in TABLES[target].items():
        changes = STATUS[step.next] != STATUS[state]
        assert step.actions.count(Ac.REPORT_STATUS) == int(changes), (state, event)


@pytest.mark.parametrize("target", list(Target))
def test_cancel_is_taken_in_every_state_and_ignored_once_released(target: Target) -> None:
    table = TABLES[target]
    for state in STATES[target]:
        step = table[(state, Ev.CANCEL)]
        if state in RELEASED | FINAL | CANCELLING:
            assert step.next is state and step.actions == ()
        elif state is St.IDLE:
            assert step.next is St.CANCELLED
        else:
            assert step.next in CANCELLING
            assert step.actions == (Ac.REPORT_STATUS, Ac.INTERRUPT)


@pytest.mark.parametrize("target", list(Target))
def test_cancelling_only_becomes_what_the_cancelling_rule_allows(target: Target) -> None:
    for (state, event), step in TABLES[target].items():
        if state in CANCELLING and step.next not in CANCELLING:
            assert STATUS[step.next] in AFTER_CANCELLING, (state, event)
            assert may_become(STATUS[state], STATUS[step.next])


@pytest.mark.parametrize("target", list(Target))
def test_a_released_vm_is_rolled_back_only_when_the_destination_does_not_run_it(
    target: Target,
) -> None:
    """After "go": only a destination that did not start the VM, or stopped it after the
    audit failed (pre-copy only: after post-copy it ran there), gives it back; anything
    else leaves it paused here."""
    assert {
        (St.HANDING_OVER, Ev.DESTINATION_FAILED),
        (St.AUDITING, Ev.AUDIT_FAILED),
        (St.POSTCOPY_HANDING_OVER, Ev.DESTINATION_FAILED),
    } == ROLLBACK_AFTER_RELEASE
    for (state, event), step in TABLES[target].items():
        if (state, event) in ROLLBACK_AFTER_RELEASE:
            assert Ac.ROLLBACK in step.actions and step.next is St.FAILED
        if state in RELEASED and (state, event) not in ROLLBACK_AFTER_RELEASE:
            assert Ac.ROLLBACK not in step.actions, (state, event)
            assert step.next in RELEASED or step.next is St.CONTINUED or step.next is state
        ends_here = step.next in {St.FAILED, St.CANCELLED} and state not in FINAL
        if ends_here and state not in RELEASED and state is not St.IDLE:
            assert Ac.ROLLBACK in step.actions, (state, event)


@pytest.mark.parametrize("target", list(Target))
def test_the_destination_is_told_only_while_the_stream_is_whole(target: Target) -> None:
    sections_flow = {
        St.AWAIT_ACCEPTED,
        St.PRECOPY,
        St.STOP_COPY,
        St.POSTCOPY_SWITCH,
        St.CANCELLING,
    }
    after_end = {St.AWAIT_READY, St.POSTCOPY_AWAIT_READY, St.CANCELLING_AFTER_END}
    broken = {Ev.PEER_CLOSED, Ev.PEER_SILENT, Ev.DESTINATION_FAILED}
    for (state, event), step in TABLES[target].items():
        told = {Ac.TELL_ABORT, Ac.TELL_ABANDON} & set(step.actions)
        if target is Target.FILE or event in broken:
            assert not told, (state, event)
        if Ac.TELL_ABORT in told:
            assert state in sections_flow and event is not Ev.STREAM_ENDED
        if Ac.TELL_ABANDON in told:
            assert state in after_end or (state, event) == (St.CANCELLING, Ev.STREAM_ENDED)


@pytest.mark.parametrize("target", list(Target))
def test_the_driver_always_has_a_next_event_to_wait_for(target: Target) -> None:
    for (state, event), step in TABLES[target].items():
        if step.next in FINAL | CANCELLING or (step.next is state and not step.actions):
            continue
        assert step.actions and step.actions[-1] in YIELDING, (state, event)


def test_each_state_shows_qemus_status() -> None:
    want = {
        St.IDLE: "none",
        St.SETUP: "setup",
        St.AWAIT_ACCEPTED: "setup",
        St.PRECOPY: "active",
        St.STOP_COPY: "device",
        St.AWAIT_READY: "device",
        St.HANDING_OVER: "device",
        St.AUDITING: "device",  # the source still holds the VM until the audit passed
        # QEMU 7.2 says postcopy-active from the switch on (its VM stopped meanwhile).
        St.POSTCOPY_SWITCH: "postcopy-active",
        St.POSTCOPY_AWAIT_READY: "postcopy-active",
        St.POSTCOPY_HANDING_OVER: "postcopy-active",
        St.POSTCOPY_ACTIVE: "postcopy-active",
        St.POSTCOPY_AUDITING: "postcopy-active",
        St.POSTCOPY_PAUSED: "postcopy-paused",
        St.COMPLETED: "completed",
        St.SAVED: "completed",
        St.CONTINUED: "completed",
        St.CANCELLING_NO_PEER: "cancelling",
        St.CANCELLING: "cancelling",
        St.CANCELLING_AFTER_END: "cancelling",
        St.CANCELLED: "cancelled",
        St.FAILED: "failed",
        St.FAILED_AFTER_RELEASE: "failed",
    }
    assert dict(STATUS) == want  # StrEnum members equal QMP's strings


def test_a_status_is_the_string_qmp_emits() -> None:
    # Stats, events and report.py's sets of names hold plain strings: a member must pass.
    assert json.dumps({"status": MigrationStatus.DEVICE}) == '{"status": "device"}'
    assert MigrationStatus.ACTIVE in {"active", "device"}
    assert f"{MigrationStatus.CANCELLED}" == "cancelled"
    assert [s.value for s in MigrationStatus] == [
        "none",
        "setup",
        "active",
        "device",
        "completed",
        "failed",
        "cancelling",
        "cancelled",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
    ]


def test_the_cancelling_rule_as_data() -> None:
    assert set(AFTER_CANCELLING) == {"cancelled", "failed", "completed"}
    assert not may_become("cancelling", MigrationStatus.DEVICE)
    assert not may_become(MigrationStatus.CANCELLING, "active")
    assert may_become("cancelling", "cancelled")
    assert may_become("active", "device")


# ---- the real walks


def test_a_tcp_migration_walks_setup_rounds_switchover_hand_over() -> None:
    m = SourceMachine(Target.LIVE)
    statuses: list[MigrationStatus] = []
    actions: list[SourceAction] = []
    for e in (
        Ev.START,
        Ev.CONNECTED,
        Ev.ACCEPTED,
        Ev.ROUND_CONTINUE,
        Ev.ROUND_CONTINUE,
        Ev.ROUND_SWITCHOVER,
        Ev.STREAM_ENDED,
        Ev.READY,
        Ev.RESUMED,
    ):
        step = m.step(e)
        actions += step
        if Ac.REPORT_STATUS in step:
            statuses.append(m.status)
    assert statuses == ["setup", "active", "device", "completed"]
    assert actions == [
        Ac.REPORT_STATUS,
        Ac.CONNECT,
        Ac.SEND_CONFIG,
        Ac.WATCH_PEER,
        Ac.AWAIT_ACCEPTED,
        Ac.START_DIRTY_TRACKING,
        Ac.REPORT_STATUS,
        Ac.SEND_ROUND,
        Ac.SEND_ROUND,
        Ac.SEND_ROUND,
        Ac.PAUSE_VM,
        Ac.REPORT_STATUS,
        Ac.STOP_DEVICES,
        Ac.SEND_FINAL_ROUND,
        Ac.SEND_CPU_AND_DEVICES,
        Ac.SEND_VERIFY,
        Ac.END_STREAM,
        Ac.AWAIT_READY,
        Ac.SEND_GO,
        Ac.STOP_DIRTY_TRACKING,
        Ac.AWAIT_RESUMED,
        Ac.REPORT_STATUS,
        Ac.RELEASE_DEVICES,
    ]
    assert m.released and not m.resumable and m.finished
    assert m.step(Ev.CANCEL) == () and m.state is St.COMPLETED


@pytest.mark.parametrize(
    ("landed", "tail"),
    [(Ev.PAGES_LANDED, ()), (Ev.PAGES_LANDED_UNAUDITED, (Ev.AUDIT_PASSED,))],
    ids=["verify-off", "audited"],
)
def test_a_postcopy_migration_reports_qemus_statuses_from_the_switch_on(
    landed: SourceEvent, tail: tuple[SourceEvent, ...]
) -> None:
    """QEMU 7.2: setup, active, then postcopy-active from the switch (not "device", though
    the VM is paused for it) until the last page, then completed; each once."""
    m = SourceMachine(Target.LIVE)
    statuses: list[MigrationStatus] = []
    for e in (
        Ev.START,
        Ev.CONNECTED,
        Ev.ACCEPTED,
        Ev.ROUND_POSTCOPY,
        Ev.STREAM_ENDED,
        Ev.READY,
        Ev.RESUMED,
        landed,
        *tail,
    ):
        step = m.step(e)
        if Ac.REPORT_STATUS in step:
            statuses.append(m.status)
        if m.state is St.POSTCOPY_SWITCH:
            assert m.status == "postcopy-active" and not m.released
    assert statuses == ["setup", "active", "postcopy-active", "completed"]
    assert m.state is St.COMPLETED


def test_a_migration_to_a_file_ends_paused_and_resumable() -> None:
    m = SourceMachine(Target.FILE)
    actions = _walk(m, Ev.START, Ev.CONNECTED, Ev.ROUND_SWITCHOVER, Ev.STREAM_ENDED)
    assert m.state is St.SAVED and m.status == "completed"
    assert m.released and m.resumable
    assert actions[:6] == [
        Ac.REPORT_STATUS,
        Ac.CONNECT,
        Ac.SEND_CONFIG,
        Ac.START_DIRTY_TRACKING,
        Ac.REPORT_STATUS,
        Ac.SEND_ROUND,
    ]
    assert actions[-3:] == [Ac.RELEASE_DEVICES, Ac.STOP_DIRTY_TRACKING, Ac.REPORT_STATUS]
    assert not {Ac.WATCH_PEER, Ac.AWAIT_READY, Ac.SEND_GO, Ac.TELL_ABORT} & set(actions)
    assert m.step(Ev.CONT) == (Ac.RESUME_HERE,)
    assert not m.released and not m.resumable and m.status == "completed"
    with pytest.raises(UnexpectedEvent, match="CONT is not expected in state CONTINUED"):
        m.step(Ev.CONT)


LIVE_CANCELS = [
    (St.SETUP, ()),
    (St.AWAIT_ACCEPTED, (Ac.TELL_ABORT,)),
    (St.PRECOPY, (Ac.TELL_ABORT,)),
    (St.STOP_COPY, (Ac.TELL_ABORT,)),
    (St.AWAIT_READY, (Ac.TELL_ABANDON,)),
]


@pytest.mark.parametrize(("state", "told"), LIVE_CANCELS, ids=[s.name for s, _ in LIVE_CANCELS])
def test_a_cancel_in_each_state_rolls_back_and_tells_what_the_stream_allows(
    state: SourceState, told: tuple[SourceAction, ...]
) -> None:
    m = _at(Target.LIVE, state)
    assert m.step(Ev.CANCEL) == (Ac.REPORT_STATUS, Ac.INTERRUPT)
    assert m.status == "cancelling" and m.cancelling
    assert m.step(Ev.CANCEL) == ()  # a second cancel says nothing new
    assert m.step(Ev.HALTED) == (*told, Ac.ROLLBACK, Ac.REPORT_STATUS)
    assert m.state is St.CANCELLED and m.status == "cancelled" and not m.released


@pytest.mark.parametrize("state", [St.SETUP, St.PRECOPY, St.STOP_COPY])
def test_a_cancel_of_a_file_migration_tells_no_one(state: SourceState) -> None:
    m = _at(Target.FILE, state)
    m.step(Ev.CANCEL)
    assert m.step(Ev.HALTED) == (Ac.ROLLBACK, Ac.REPORT_STATUS)
    assert m.state is St.CANCELLED


def test_a_cancel_before_start_ends_at_once() -> None:
    m = SourceMachine(Target.LIVE)
    assert m.step(Ev.CANCEL) == (Ac.REPORT_STATUS,)
    assert m.status == "cancelled"


def test_a_cancel_that_comes_as_the_file_is_whole_loses() -> None:
    m = _at(Target.FILE, St.STOP_COPY)
    m.step(Ev.CANCEL)
    m.step(Ev.STREAM_ENDED)
    assert m.state is St.SAVED and m.resumable


def test_a_cancel_before_ready_wins_over_ready_no_go_is_sent() -> None:
    m = _at(Target.LIVE, St.AWAIT_READY)
    m.step(Ev.CANCEL)
    actions = m.step(Ev.READY)
    assert Ac.SEND_GO not in actions
    assert actions == (Ac.TELL_ABANDON, Ac.ROLLBACK, Ac.REPORT_STATUS)


def test_a_cancel_as_the_stream_ends_tells_abandon_not_abrt() -> None:
    m = _at(Target.LIVE, St.STOP_COPY)
    m.step(Ev.CANCEL)
    assert m.step(Ev.STREAM_ENDED) == (Ac.TELL_ABANDON, Ac.ROLLBACK, Ac.REPORT_STATUS)


def test_a_cancel_after_go_is_ignored_and_the_hand_over_completes() -> None:
    m = _at(Target.LIVE, St.HANDING_OVER)
    assert m.released
    assert m.step(Ev.CANCEL) == ()
    assert m.status == "device"
    m.step(Ev.RESUMED)
    assert m.status == "completed"


def test_a_refused_set_up_fails_rolled_back_untold() -> None:
    m = SourceMachine(Target.LIVE)
    _walk(m, Ev.START, Ev.CONNECTED)
    assert m.step(Ev.DESTINATION_FAILED) == (Ac.ROLLBACK, Ac.REPORT_STATUS)
    assert m.status == "failed" and not m.released


def test_a_verify_failure_at_the_destination_rolls_back() -> None:
    m = _at(Target.LIVE, St.AWAIT_READY)
    assert m.step(Ev.DESTINATION_FAILED) == (Ac.ROLLBACK, Ac.REPORT_STATUS)
    assert m.state is St.FAILED and not m.released


def test_a_destination_lost_after_go_leaves_the_vm_paused_here() -> None:
    for lost in (Ev.PEER_CLOSED, Ev.PEER_SILENT, Ev.ERROR):
        m = _at(Target.LIVE, St.HANDING_OVER)
        assert m.step(lost) == (Ac.REPORT_STATUS,)
        assert m.state is St.FAILED_AFTER_RELEASE and m.released and m.status == "failed"


def test_a_destination_that_says_it_did_not_start_the_vm_gets_it_back() -> None:
    m = _at(Target.LIVE, St.HANDING_OVER)
    assert m.step(Ev.DESTINATION_FAILED) == (Ac.ROLLBACK, Ac.REPORT_STATUS)
    assert not m.released


def test_an_audit_that_passes_completes_and_only_then_releases_the_devices() -> None:
    m = _at(Target.LIVE, St.HANDING_OVER)
    assert m.step(Ev.RESUMED_UNAUDITED) == (Ac.SEND_AUDIT, Ac.AWAIT_AUDITED)
    assert m.state is St.AUDITING and m.status == "device" and m.released
    assert m.phase == "the audit after resume"
    assert m.step(Ev.CANCEL) == () and m.state is St.AUDITING  # too late to cancel
    assert m.step(Ev.AUDIT_PASSED) == (Ac.REPORT_STATUS, Ac.RELEASE_DEVICES)
    assert m.status == "completed"


def test_an_audit_that_fails_rolls_the_vm_back_here() -> None:
    m = _at(Target.LIVE, St.AUDITING)
    assert m.step(Ev.AUDIT_FAILED) == (Ac.ROLLBACK, Ac.REPORT_STATUS)
    assert m.state is St.FAILED and not m.released


def test_an_audit_that_fails_after_postcopy_leaves_the_vm_paused_here() -> None:
    """The guest ran at the destination since the switch: never here again."""
    m = _at(Target.LIVE, St.POSTCOPY_AUDITING)
    assert m.step(Ev.AUDIT_FAILED) == (Ac.REPORT_STATUS,)
    assert m.state is St.FAILED_AFTER_RELEASE and m.released and m.status == "failed"


def test_a_destination_lost_during_the_audit_leaves_the_vm_paused_here() -> None:
    for lost in (Ev.PEER_CLOSED, Ev.PEER_SILENT, Ev.ERROR, Ev.DESTINATION_FAILED):
        m = _at(Target.LIVE, St.AUDITING)
        assert m.step(lost) == (Ac.REPORT_STATUS,)
        assert m.state is St.FAILED_AFTER_RELEASE and m.released


def test_a_policy_that_gives_up_fails_telling_the_destination() -> None:
    m = _at(Target.LIVE, St.PRECOPY)
    assert m.step(Ev.ROUND_GIVE_UP) == (Ac.TELL_ABORT, Ac.ROLLBACK, Ac.REPORT_STATUS)


def test_a_broken_connection_mid_round_fails_untold() -> None:
    m = _at(Target.LIVE, St.PRECOPY)
    assert m.step(Ev.PEER_CLOSED) == (Ac.ROLLBACK, Ac.REPORT_STATUS)


def test_an_unexpected_reply_names_event_state_and_the_path() -> None:
    m = _at(Target.LIVE, St.PRECOPY)
    _walk(m, Ev.ROUND_CONTINUE, Ev.ROUND_CONTINUE, Ev.ROUND_SWITCHOVER, Ev.STREAM_ENDED)
    with pytest.raises(UnexpectedEvent) as err:
        m.step(Ev.RESUMED)
    msg = str(err.value)
    assert "tcp migration source: event RESUMED is not expected in state AWAIT_READY" in msg
    assert msg.endswith(
        "(after …, SETUP+CONNECTED, AWAIT_ACCEPTED+ACCEPTED, PRECOPY+ROUND_CONTINUE, "
        "PRECOPY+ROUND_CONTINUE, PRECOPY+ROUND_SWITCHOVER, STOP_COPY+STREAM_ENDED)"
    )
    assert "IDLE+START" not in msg  # the last steps, not all
    assert len(err.value.history) == 7


def test_decisions_and_replies_become_events() -> None:
    assert round_ended("continue") is Ev.ROUND_CONTINUE
    assert round_ended("switchover") is Ev.ROUND_SWITCHOVER
    assert round_ended("cancel") is Ev.ROUND_GIVE_UP
    assert [reply_event(k) for k in ("accepted", "ready", "resumed", "failed")] == [
        Ev.ACCEPTED,
        Ev.READY,
        Ev.RESUMED,
        Ev.DESTINATION_FAILED,
    ]
    with pytest.raises(MigrationError, match="unknown reply 'bogus'"):
        reply_event("bogus")
    with pytest.raises(MigrationError, match="'later'"):
        round_ended("later")


def test_phase_names_what_the_source_was_doing() -> None:
    assert _at(Target.LIVE, St.HANDING_OVER).phase == "the hand-over"
    assert _at(Target.LIVE, St.PRECOPY).phase == "the pre-copy"


def test_a_failed_reply_says_whether_the_destination_had_started_the_guest() -> None:
    """The source rolls back on a "failed" after "go" only if the guest never started
    there: the reply carries it (omitted when false, as a "failed" always was)."""
    said = Failed("vCPU 1 could not start", started=True)
    line = encode_reply(said)
    assert json.loads(line)["started"] is True and decode_reply(line) == said
    assert "started" not in json.loads(encode_reply(Failed("no go")))
    back = decode_reply(encode_reply(Failed("no go")))
    assert isinstance(back, Failed) and back.started is False
    with pytest.raises(MigrationError, match="field 'started' is 'yes', want bool"):
        decode_reply(b'{"kind": "failed", "error": "x", "started": "yes"}\n')


def test_x_postcopy_after_with_x_verify_strict_is_refused_at_migrate_in_one_line() -> None:
    params = MigrationParameters(verify="strict", postcopy_after="2")
    caps = MigrationCapabilities(postcopy_ram=True)
    with pytest.raises(ConfigError) as e:
        MigrationSource(cast(Machine, None), "tcp:127.0.0.1:1", params, caps)
    assert str(e.value).startswith("x-postcopy-after '2' cannot apply with x-verify strict")
    assert "\n" not in str(e.value)


def test_accepted_says_why_the_destination_cannot_do_postcopy_only_when_it_cannot() -> None:
    said = Accepted(postcopy="userfaultfd(2) failed: Operation not permitted (errno 1)")
    assert decode_reply(encode_reply(said)) == said
    assert json.loads(encode_reply(Accepted())) == {"kind": "accepted"}
    back = decode_reply(encode_reply(Accepted()))
    assert isinstance(back, Accepted) and back.postcopy == ""
