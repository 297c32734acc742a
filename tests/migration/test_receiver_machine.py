"""The destination's table: every (state, event) pair, its agreement with the stream's
grammar, the real walks, and the rules it must keep (no guest before go, abandon)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.migration.tables import (
    assert_each_state_can_end,
    assert_steps_as_the_table_says,
    put_at,
    shortest_paths,
    steps,
)
from vmferry.errors import MigrationError, StreamError
from vmferry.migration.codec import ConfigRecord
from vmferry.migration.loader import SectionLoop
from vmferry.migration.receiver_machine import (
    FINAL,
    SECTION_EVENTS,
    STATES,
    STATUS,
    TABLE,
    TABLES,
    ReceiverAction,
    ReceiverEvent,
    ReceiverMachine,
    ReceiverState,
    reply_event,
    section_event,
)
from vmferry.migration.source_machine import Target
from vmferry.migration.stream import MAIN_GRAMMAR
from vmferry.migration.table import UnexpectedEvent

Rs, Re, Ra = ReceiverState, ReceiverEvent, ReceiverAction
SECTIONS = set(SECTION_EVENTS.values())
# A source is connected: every state but before one came and the two ends.
# (AUDITING: the guest runs here already; its own rules below.)
# (POSTCOPY_*: the guest runs here while its pages come, or they came and it is audited.)
POSTCOPY = {Rs.POSTCOPY_ACTIVE, Rs.POSTCOPY_AUDITING, Rs.POSTCOPY_PAUSED}
CONNECTED = set(Rs) - {Rs.IDLE, Rs.WAITING, Rs.RUNNING, Rs.FAILED, Rs.AUDITING} - POSTCOPY
YIELDING = {
    Ra.AWAIT_SOURCE,
    Ra.READ_SECTION,
    Ra.SET_UP,
    Ra.VERIFY,
    Ra.AWAIT_GO,
    Ra.AWAIT_AUDIT,
    Ra.AWAIT_LANDED,
    Ra.AWAIT_RECOVER,
}


PATHS = {t: shortest_paths(TABLES[t], Rs.IDLE) for t in Target}


def _at(state: ReceiverState, target: Target = Target.LIVE) -> ReceiverMachine:
    m = put_at(ReceiverMachine(target), PATHS[target][state])
    assert m.state is state
    return m


_walk = steps


ALL = [(t, s, e) for t in Target for s in Rs if s in STATES[t] for e in Re]
TARGETS = pytest.mark.parametrize("target", list(Target), ids=[t.value for t in Target])


@pytest.mark.parametrize(
    ("target", "state", "event"), ALL, ids=[f"{t.value}-{s.name}-{e.name}" for t, s, e in ALL]
)
def test_every_pair_steps_as_the_table_says_or_is_refused_naming_both(
    target: Target, state: ReceiverState, event: ReceiverEvent
) -> None:
    assert_steps_as_the_table_says(_at(state, target), TABLES[target], STATUS, event)


@TARGETS
def test_every_state_is_reached_and_every_one_can_end(target: Target) -> None:
    assert set(PATHS[target]) == STATES[target]
    assert_each_state_can_end(TABLES[target], STATES[target], FINAL)


# Which state reads the section that follows each grammar row (None: the stream start).
_AFTER = {
    None: Rs.AWAIT_CONF,
    b"CONF": Rs.LOADING,  # once SETTING_UP has prepared for the stream
    b"RAM\0": Rs.LOADING,
    b"RND\0": Rs.LOADING,
    b"DEVD": Rs.LOADING,
    b"CPUS": Rs.AFTER_CPUS,
    b"DEVS": Rs.AFTER_DEVS,
    b"VRFY": Rs.AFTER_VRFY,
    b"END\0": Rs.VERIFYING,
    b"ABRT": Rs.FAILED,
    b"PCPY": Rs.AFTER_PCPY,
}
# A save file is never post-copy: its table takes no PCPY (the section is refused).
_NOT_IN_FILES = {b"PCPY"}


@TARGETS
def test_the_section_events_follow_the_stream_grammar_exactly(target: Target) -> None:
    table = TABLES[target]
    assert set(_AFTER) == set(MAIN_GRAMMAR)
    for last, allowed in MAIN_GRAMMAR.items():
        if target is Target.FILE:
            if last in _NOT_IN_FILES:
                continue
            allowed -= _NOT_IN_FILES
        state = _AFTER[last]
        taken = {e for e in SECTIONS if (state, e) in table}
        assert taken == {section_event(t) for t in allowed}, section_event(last) if last else None
    for state in set(Rs) - set(_AFTER.values()):
        assert not {e for e in SECTIONS if (state, e) in table}, state


@TARGETS
def test_status_is_reported_exactly_when_it_changes(target: Target) -> None:
    for (state, event), step in TABLES[target].items():
        changes = STATUS[step.next] != STATUS[state]
        assert step.actions.count(Ra.REPORT_STATUS) == int(changes), (state, event)


@TARGETS
def test_abandon_is_taken_in_every_state_and_changes_nothing_once_running(
    target: Target,
) -> None:
    for state in STATES[target]:
        step = TABLES[target][(state, Re.ABANDON)]
        if state in FINAL:
            assert step.next is state and step.actions == ()
        elif state in (Rs.AUDITING, Rs.POSTCOPY_AUDITING):
            # the guest runs here, whole: a source that gives up leaves it
            assert step.next is Rs.RUNNING and Ra.STOP_VM not in step.actions
        elif state in (Rs.POSTCOPY_ACTIVE, Rs.POSTCOPY_PAUSED):
            # its pages are not all here: it cannot run on, it stops
            assert step.next is Rs.FAILED and Ra.STOP_VM in step.actions
        else:
            assert step.next is Rs.FAILED


def test_every_failure_with_a_source_tells_it_and_discards_the_load() -> None:
    for (state, event), step in TABLE.items():
        if state in CONNECTED and step.next is Rs.FAILED:
            assert step.actions == (
                Ra.STOP_HEARTBEAT,
                Ra.SEND_FAILED,
                Ra.DISCARD,
                Ra.REPORT_STATUS,
            ), (state, event)


def test_a_restored_file_starts_only_after_a_whole_verified_stream() -> None:
    table = TABLES[Target.FILE]
    into = {(s, e) for (s, e), st in table.items() if st.next is Rs.RUNNING and s is not Rs.RUNNING}
    assert into == {(Rs.VERIFYING, Re.VERIFY_PASSED)}
    for (state, event), step in table.items():
        told = {Ra.SEND_FAILED, Ra.SEND_ACCEPTED, Ra.SEND_READY, Ra.START_HEARTBEAT}
        assert not told & set(step.actions), (state, event)  # nobody to talk to
        if step.next is Rs.FAILED and state is not Rs.FAILED and state is not Rs.IDLE:
            assert step.actions == (Ra.DISCARD, Ra.REPORT_STATUS), (state, event)


def test_the_guest_starts_only_on_go_after_a_whole_verified_stream() -> None:
    into = {
        (s, e)
        for (s, e), step in TABLE.items()
        if step.next in (Rs.RUNNING, Rs.AUDITING, *POSTCOPY)
        and s not in (Rs.RUNNING, Rs.AUDITING, *POSTCOPY)
    }
    assert into == {(Rs.READY, Re.GO), (Rs.READY, Re.GO_UNAUDITED), (Rs.READY, Re.GO_POSTCOPY)}
    assert {(s, e) for (s, e), st in TABLE.items() if st.next is Rs.READY} == {
        (Rs.VERIFYING, Re.VERIFY_PASSED)
    }
    assert {s for (s, e), st in TABLE.items() if st.next is Rs.VERIFYING} == {
        Rs.AFTER_DEVS,
        Rs.AFTER_VRFY,
        Rs.AFTER_PCPY,
    }
    starts = {(s, e) for (s, e), st in TABLE.items() if Ra.START_VM in st.actions}
    assert starts == {(Rs.READY, Re.GO), (Rs.READY, Re.GO_UNAUDITED), (Rs.READY, Re.GO_POSTCOPY)}
    for (state, event), step in TABLE.items():
        if state is Rs.RUNNING:
            assert step.next is Rs.RUNNING and not step.actions, event  # nothing closes it


@TARGETS
def test_the_driver_always_has_a_next_event_to_wait_for(target: Target) -> None:
    for (state, event), step in TABLES[target].items():
        if step.next in FINAL or (step.next is state and not step.actions):
            continue
        assert step.actions[-1] in YIELDING, (state, event)


def test_each_state_shows_the_destinations_status() -> None:
    assert STATUS[Rs.IDLE] == "none"
    assert STATUS[Rs.WAITING] == "setup"
    assert all(STATUS[s] == "active" for s in CONNECTED)
    assert STATUS[Rs.AUDITING] == "active"  # not done until the audit passed
    assert STATUS[Rs.POSTCOPY_ACTIVE] == STATUS[Rs.POSTCOPY_AUDITING] == "postcopy-active"
    assert STATUS[Rs.POSTCOPY_PAUSED] == "postcopy-paused"
    assert STATUS[Rs.RUNNING] == "completed" and STATUS[Rs.FAILED] == "failed"
    assert set(STATUS) == set(Rs)


# ---- the real walks

_SETUP = (Re.START, Re.CONNECTED, Re.CONF, Re.SET_UP)


def test_a_migration_with_verification_loads_verifies_and_runs_on_go() -> None:
    m = ReceiverMachine()
    actions = _walk(
        m,
        *_SETUP,
        Re.RAM,
        Re.DEVD,
        Re.RND,
        Re.RAM,
        Re.RND,
        Re.CPUS,
        Re.DEVS,
        Re.VRFY,
        Re.END,
        Re.VERIFY_PASSED,
    )
    assert m.state is Rs.READY and not m.started
    assert actions[:7] == [
        Ra.REPORT_STATUS,
        Ra.AWAIT_SOURCE,
        Ra.REPORT_STATUS,
        Ra.START_HEARTBEAT,
        Ra.READ_SECTION,
        Ra.SET_UP,
        Ra.SEND_ACCEPTED,
    ]
    assert actions[-6:] == [
        Ra.LOAD_DIGESTS,
        Ra.READ_SECTION,
        Ra.FINISH_LOAD,
        Ra.VERIFY,
        Ra.SEND_READY,
        Ra.AWAIT_GO,
    ]
    assert actions.count(Ra.END_ROUND) == 2 and actions.count(Ra.LOAD_RAM) == 2
    assert m.step(Re.GO) == (
        Ra.START_VM,
        Ra.REPORT_STATUS,
        Ra.SEND_RESUMED,
        Ra.STOP_HEARTBEAT,
    )
    assert m.started and m.status == "completed"
    assert m.step(Re.SOURCE_CLOSED) == ()  # the source hangs up after "resumed"
    assert m.step(Re.ABANDON) == () and m.started


def test_only_a_failed_audit_stops_a_started_guest_and_it_tells_the_source() -> None:
    stops = {(s, e) for (s, e), st in TABLE.items() if Ra.STOP_VM in st.actions}
    audits = {
        (s, e) for s in (Rs.AUDITING, Rs.POSTCOPY_AUDITING) for e in (Re.AUDIT_FAILED, Re.ERROR)
    }
    # Post-copy's guest, lost its source before the last page, cannot run on.
    lost = {
        (s, e)
        for s in (Rs.POSTCOPY_ACTIVE, Rs.POSTCOPY_PAUSED)
        for e in (Re.ERROR, Re.ABANDON, Re.SOURCE_SILENT, Re.SOURCE_CLOSED)
    }
    assert stops == audits | lost
    for key in lost:
        acts = TABLE[key].actions
        assert acts.index(Ra.STOP_VM) < acts.index(Ra.END_POSTCOPY) < acts.index(Ra.DISCARD)
        assert TABLE[key].next is Rs.FAILED and Ra.SEND_FAILED in acts
    for key in audits:
        acts = TABLE[key].actions
        # stopped, its held frames dropped, then the source told: it may run the VM again
        assert acts.index(Ra.STOP_VM) < acts.index(Ra.DROP_OUTPUT) < acts.index(Ra.SEND_AUDITED)
        assert acts.index(Ra.SEND_AUDITED) < acts.index(Ra.DISCARD)
        assert TABLE[key].next is Rs.FAILED


def test_a_postcopy_migration_runs_on_go_with_pages_missing_then_is_audited() -> None:
    m = _at(Rs.AFTER_DEVS)
    assert _walk(m, Re.PCPY, Re.END) == [
        Ra.LOAD_OWED,
        Ra.READ_SECTION,
        Ra.FINISH_LOAD,
        Ra.PREPARE_POSTCOPY,  # before the check, "ready" and the guest
        Ra.VERIFY,
    ]
    _walk(m, Re.VERIFY_PASSED)
    acts = m.step(Re.GO_POSTCOPY)
    assert acts.index(Ra.GATE_DMA) < acts.index(Ra.START_VM)  # no DMA on a missing page
    assert m.status == "postcopy-active" and m.started and m.postcopy
    assert m.step(Re.LANDED_UNAUDITED) == (Ra.END_POSTCOPY, Ra.SEND_LANDED, Ra.AWAIT_AUDIT)
    assert m.status == "postcopy-active"
    m.step(Re.AUDIT_PASSED)
    assert m.state is Rs.RUNNING and m.status == "completed"


def test_an_audited_migration_runs_on_go_and_completes_when_the_audit_passed() -> None:
    m = _at(Rs.READY)
    assert m.step(Re.GO_UNAUDITED) == (
        Ra.HOLD_OUTPUT,
        Ra.START_VM,
        Ra.SEND_RESUMED,
        Ra.AWAIT_AUDIT,
    )
    assert m.started and m.status == "active" and m.phase == "the audit after resume"
    assert Ra.RELEASE_OUTPUT in m.step(Re.AUDIT_PASSED)
    assert m.state is Rs.RUNNING and m.status == "completed"


def test_a_stream_without_digests_ends_after_devs() -> None:
    m = ReceiverMachine()
    _walk(m, *_SETUP, Re.CPUS, Re.DEVS, Re.END)
    assert m.state is Rs.VERIFYING


def test_a_save_file_is_read_verified_and_run() -> None:
    m = ReceiverMachine(Target.FILE)
    actions = _walk(m, Re.START, Re.CONF, Re.SET_UP, Re.RAM, Re.RND, Re.CPUS, Re.DEVS)
    assert actions[:4] == [Ra.REPORT_STATUS, Ra.READ_SECTION, Ra.SET_UP, Ra.READ_SECTION]
    _walk(m, Re.VRFY, Re.END)
    assert m.step(Re.VERIFY_PASSED) == (Ra.START_VM, Ra.REPORT_STATUS)
    assert m.started and m.status == "completed"
    with pytest.raises(UnexpectedEvent, match="restore from a file: event GO"):
        m.step(Re.GO)


def test_a_save_file_that_ends_early_discards_the_load() -> None:
    m = _at(Rs.AFTER_CPUS, Target.FILE)
    assert m.step(Re.ERROR) == (Ra.DISCARD, Ra.REPORT_STATUS)
    assert m.status == "failed"


def test_strangers_are_refused_and_the_wait_goes_on() -> None:
    m = ReceiverMachine()
    m.step(Re.START)
    for _ in range(3):
        assert m.step(Re.STRANGER) == (Ra.REFUSE_CONNECTION, Ra.AWAIT_SOURCE)
        assert m.status == "setup"
    m.step(Re.CONNECTED)
    assert m.status == "active"


@pytest.mark.parametrize("state", [Rs.LOADING, Rs.AFTER_CPUS, Rs.AFTER_DEVS, Rs.AFTER_VRFY])
def test_an_abrt_between_sections_fails_the_load(state: ReceiverState) -> None:
    m = _at(state)
    assert m.step(Re.ABRT)[-2:] == (Ra.DISCARD, Ra.REPORT_STATUS)
    assert m.status == "failed"


def test_a_verification_failure_refuses_the_vm() -> None:
    m = _at(Rs.VERIFYING)
    assert Ra.SEND_FAILED in m.step(Re.VERIFY_FAILED)
    assert m.state is Rs.FAILED and not m.started


@pytest.mark.parametrize("event", [Re.ABANDON, Re.SOURCE_SILENT, Re.SOURCE_CLOSED, Re.ERROR])
def test_no_go_means_no_guest(event: ReceiverEvent) -> None:
    m = _at(Rs.READY)
    actions = m.step(event)
    assert Ra.START_VM not in actions and Ra.DISCARD in actions
    assert m.state is Rs.FAILED


def test_a_section_out_of_order_names_it_and_the_state() -> None:
    m = ReceiverMachine()
    _walk(m, *_SETUP, Re.RAM)
    with pytest.raises(UnexpectedEvent, match="event END is not expected in state LOADING"):
        m.step(Re.END)
    with pytest.raises(UnexpectedEvent, match="event VRFY is not expected in state LOADING"):
        m.step(Re.VRFY)


def test_section_tags_and_reply_lines_become_events() -> None:
    assert section_event(b"RAM\0") is Re.RAM
    assert section_event(b"RND\0") is Re.RND
    assert section_event(b"END\0") is Re.END
    assert section_event(b"CONF") is Re.CONF
    with pytest.raises(StreamError, match="a CHAN section has no place in the main stream"):
        section_event(b"CHAN")
    assert reply_event("go") is Re.GO
    assert reply_event("abandon") is Re.ABANDON
    with pytest.raises(MigrationError, match="did not hand over: it sent 'ready'"):
        reply_event("ready")


def test_phase_names_what_was_being_read() -> None:
    assert _at(Rs.LOADING).phase == "the rounds"
    assert _at(Rs.READY).phase == "the wait for the hand-over"


def test_a_pcpy_section_in_a_strict_stream_is_refused_in_one_line() -> None:
    """Strict checks all of RAM before the resume; a post-copy switch sends some after it:
    the loader refuses the PCPY before it reads the owed pages."""
    loop = object.__new__(SectionLoop)
    loop.head = cast(ConfigRecord, SimpleNamespace(verify="strict"))
    header = SimpleNamespace(describe=lambda: "the PCPY section at offset 4096")
    loop._section = cast(Any, (header, None))
    with pytest.raises(StreamError) as e:
        loop._load_owed()
    assert str(e.value) == (
        "the PCPY section at offset 4096: a post-copy switch in an x-verify strict stream "
        "(strict checks all of RAM before the resume, which post-copy sends after it)"
    )
