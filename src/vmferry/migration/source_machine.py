"""The source of a migration as a table: (state, event) → next state, actions.

A live (tcp) migration connects, sends the CONF and waits for the destination's
``accepted`` (SETUP, AWAIT_ACCEPTED: "setup"); sends pre-copy rounds while the policy
says continue (PRECOPY: "active"); on switchover pauses the VM, stops the devices and
sends the rest, the CPU state, the digests and END (STOP_COPY: "device"); waits for
``ready`` (AWAIT_READY) and answers ``go``, which releases the VM: from then on it never
runs here again (HANDING_OVER), until ``resumed`` (COMPLETED). With x-verify on the
destination resumed after a check of only what the dirty log cannot vouch for: the source
digests all of its (frozen) RAM and sends the digests (AUDITING: still "device", the
source holds the VM's state); the audit passed completes it; a mismatch — the destination
says it stopped its VM — rolls the VM back here (FAILED), the one rollback after "go";
a destination lost during the audit may be running the VM (FAILED_AFTER_RELEASE).
Post-copy (postcopy-ram, the switch asked for by ``request_postcopy`` or due by
x-postcopy-after): at a round's end the policy's decision becomes ROUND_POSTCOPY. The VM
pauses, the devices stop and their state goes with the CPU state, the record of the pages
the destination must not trust ("owed") and END — no final RAM round (POSTCOPY_SWITCH:
"postcopy-active" from here on, as QEMU 7.2 says it from the switch); after ``ready`` and
``go`` the page server answers the destination's requests and pushes every owed page
(POSTCOPY_HANDING_OVER, then POSTCOPY_ACTIVE); once the destination says the last page
landed, the audit (x-verify on: POSTCOPY_AUDITING, still "postcopy-active") or
COMPLETED. The VM's state is split after "go": a lost destination loses the VM
(FAILED_AFTER_RELEASE, the source keeps its memory until quit), and a failed audit too:
the destination stopped its VM, but it ran there since the switch, so it never runs here
again (its outside effects would come twice).
A file: target has no destination to ask: after END the VM stays paused here,
resumable (SAVED), and ``cont``
runs it again (CONTINUED). Before the release every failure rolls the VM back and a
cancel is accepted in every state: the machine is "cancelling" until the step in flight
ends, then "cancelled". The destination is told why the source gives up only while the
stream is whole: an ABRT section before END, an ``abandon`` line after it; never after
a broken connection, a silent peer, or a destination that failed first. After the
release a cancel is ignored, and a lost destination leaves the VM paused here
(FAILED_AFTER_RELEASE): the destination may be running it or have stopped it.

The driver turns what it sees into events (``round_ended``, ``reply_event``, an error
classified as ERROR, PEER_CLOSED or PEER_SILENT) and carries out the returned actions in
order; an action that waits or sends yields the next event (a file has no peer: a failed
write is an ERROR, and no PEER_* event is legal). A cancel comes from another thread:
the driver serialises steps, and between actions looks whether the state became a
cancelling one (then it feeds HALTED).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from vmferry.errors import MigrationError
from vmferry.migration.source_events import SourceAction, SourceEvent, SourceState, Target
from vmferry.migration.status import MigrationStatus
from vmferry.migration.table import Step, Walk

St, Ev, Ac = SourceState, SourceEvent, SourceAction
SourceTable = Mapping[tuple[SourceState, SourceEvent], Step[SourceState, SourceAction]]

STATUS: Mapping[SourceState, MigrationStatus] = MappingProxyType(
    {
        St.IDLE: MigrationStatus.NONE,
        St.SETUP: MigrationStatus.SETUP,
        St.AWAIT_ACCEPTED: MigrationStatus.SETUP,
        St.PRECOPY: MigrationStatus.ACTIVE,
        St.STOP_COPY: MigrationStatus.DEVICE,
        St.AWAIT_READY: MigrationStatus.DEVICE,
        St.HANDING_OVER: MigrationStatus.DEVICE,
        # Not "completed": until the audit passed the source must not be let go.
        St.AUDITING: MigrationStatus.DEVICE,
        # QEMU 7.2's: postcopy-active from the switch on (its VM is stopped in it).
        St.POSTCOPY_SWITCH: MigrationStatus.POSTCOPY_ACTIVE,
        St.POSTCOPY_AWAIT_READY: MigrationStatus.POSTCOPY_ACTIVE,
        St.POSTCOPY_HANDING_OVER: MigrationStatus.POSTCOPY_ACTIVE,
        St.POSTCOPY_ACTIVE: MigrationStatus.POSTCOPY_ACTIVE,
        St.POSTCOPY_AUDITING: MigrationStatus.POSTCOPY_ACTIVE,
        St.POSTCOPY_PAUSED: MigrationStatus.POSTCOPY_PAUSED,
        St.COMPLETED: MigrationStatus.COMPLETED,
        St.SAVED: MigrationStatus.COMPLETED,
        St.CONTINUED: MigrationStatus.COMPLETED,
        St.CANCELLING_NO_PEER: MigrationStatus.CANCELLING,
        St.CANCELLING: MigrationStatus.CANCELLING,
        St.CANCELLING_AFTER_END: MigrationStatus.CANCELLING,
        St.CANCELLED: MigrationStatus.CANCELLED,
        St.FAILED: MigrationStatus.FAILED,
        St.FAILED_AFTER_RELEASE: MigrationStatus.FAILED,
    }
)

#: What the source was doing, for "the destination closed the connection during …".
PHASE: Mapping[SourceState, str] = MappingProxyType(
    {
        St.SETUP: "the set-up",
        St.AWAIT_ACCEPTED: "the set-up",
        St.PRECOPY: "the pre-copy",
        St.STOP_COPY: "the switchover",
        St.AWAIT_READY: "the switchover",
        St.HANDING_OVER: "the hand-over",
        St.AUDITING: "the audit after resume",
        St.POSTCOPY_SWITCH: "the switch to post-copy",
        St.POSTCOPY_AWAIT_READY: "the switch to post-copy",
        St.POSTCOPY_HANDING_OVER: "post-copy",
        St.POSTCOPY_ACTIVE: "post-copy",
        St.POSTCOPY_AUDITING: "the audit after post-copy",
        St.POSTCOPY_PAUSED: "post-copy (paused)",
    }
)

#: The VM belongs to the destination (or to the file): it must not run here on its own.
POSTCOPY_RELEASED: frozenset[SourceState] = frozenset(
    {St.POSTCOPY_HANDING_OVER, St.POSTCOPY_ACTIVE, St.POSTCOPY_AUDITING, St.POSTCOPY_PAUSED}
)
RELEASED: frozenset[SourceState] = frozenset(
    {St.HANDING_OVER, St.AUDITING, St.COMPLETED, St.SAVED, St.FAILED_AFTER_RELEASE}
    | POSTCOPY_RELEASED
)
#: The states of a migration that switched to post-copy.
POSTCOPY: frozenset[SourceState] = frozenset({St.POSTCOPY_SWITCH, St.POSTCOPY_AWAIT_READY})
POSTCOPY |= POSTCOPY_RELEASED
#: The one way back after "go": the audit found a mismatch and the destination said it
#: stopped its VM.
ROLLBACK_AFTER_RELEASE: frozenset[tuple[SourceState, SourceEvent]] = frozenset(
    {
        (St.HANDING_OVER, SourceEvent.DESTINATION_FAILED),
        (St.AUDITING, SourceEvent.AUDIT_FAILED),
        # It says it did not start the VM (it gave up waiting for "go").
        (St.POSTCOPY_HANDING_OVER, SourceEvent.DESTINATION_FAILED),
    }
)
FINAL: frozenset[SourceState] = frozenset(
    {St.COMPLETED, St.SAVED, St.CONTINUED, St.CANCELLED, St.FAILED, St.FAILED_AFTER_RELEASE}
)

_CANCELLING = (St.CANCELLING_NO_PEER, St.CANCELLING, St.CANCELLING_AFTER_END)
#: The states each target goes through (a file has no destination to wait for).
STATES: Mapping[Target, frozenset[SourceState]] = MappingProxyType(
    {
        Target.LIVE: frozenset(SourceState) - {St.SAVED, St.CONTINUED},
        Target.FILE: frozenset(SourceState)
        - {
            St.AWAIT_ACCEPTED,
            St.AWAIT_READY,
            St.HANDING_OVER,
            St.AUDITING,
            St.COMPLETED,
            St.CANCELLING,
            St.CANCELLING_AFTER_END,
            St.FAILED_AFTER_RELEASE,
            *POSTCOPY,
        },
    }
)

_FAIL = (Ac.ROLLBACK, Ac.REPORT_STATUS)
_ABORT = (Ac.TELL_ABORT, *_FAIL)
_ABANDON = (Ac.TELL_ABANDON, *_FAIL)
_CANCEL = (Ac.REPORT_STATUS, Ac.INTERRUPT)
_ROUND = (Ac.SEND_ROUND,)
_START_ROUNDS = (Ac.START_DIRTY_TRACKING, Ac.REPORT_STATUS, Ac.SEND_ROUND)
_SWITCHOVER = (
    Ac.PAUSE_VM,
    Ac.REPORT_STATUS,
    Ac.STOP_DEVICES,
    Ac.SEND_FINAL_ROUND,
    Ac.SEND_CPU_AND_DEVICES,
    Ac.SEND_VERIFY,
    Ac.END_STREAM,
)
# No final RAM round: what is owed goes after the resume (that is what post-copy saves).
_POSTCOPY_SWITCH = (
    Ac.PAUSE_VM,
    Ac.REPORT_STATUS,
    Ac.STOP_DEVICES,
    Ac.SYNC_OWED,
    Ac.SEND_CPU_AND_DEVICES,
    Ac.SEND_VERIFY,
    Ac.SEND_OWED,
    Ac.OPEN_POSTCOPY,
    Ac.END_STREAM,
)
_SAVE = (Ac.RELEASE_DEVICES, Ac.STOP_DIRTY_TRACKING, Ac.REPORT_STATUS)
_PEER_LOST = (Ev.DESTINATION_FAILED, Ev.PEER_SILENT, Ev.PEER_CLOSED)
_LOCAL = (Ev.ERROR, Ev.GUEST_ENDED)
_ROUND_ENDED = (Ev.ROUND_CONTINUE, Ev.ROUND_SWITCHOVER, Ev.ROUND_GIVE_UP, Ev.ROUND_POSTCOPY)

_Rows = dict[tuple[SourceState, SourceEvent], Step[SourceState, SourceAction]]


def _rows(
    state: SourceState, events: tuple[SourceEvent, ...], step: Step[SourceState, SourceAction]
) -> _Rows:
    return {(state, e): step for e in events}


def _common(target: Target) -> _Rows:
    """Rows both targets share: the start, the ends, and a cancel that changes nothing."""
    rows: _Rows = {
        (St.IDLE, Ev.START): Step(St.SETUP, (Ac.REPORT_STATUS, Ac.CONNECT)),
        (St.IDLE, Ev.CANCEL): Step(St.CANCELLED, (Ac.REPORT_STATUS,)),
        (St.SETUP, Ev.CANCEL): Step(St.CANCELLING_NO_PEER, _CANCEL),
        (St.PRECOPY, Ev.ROUND_CONTINUE): Step(St.PRECOPY, _ROUND),
        (St.PRECOPY, Ev.ROUND_SWITCHOVER): Step(St.STOP_COPY, _SWITCHOVER),
        (St.SAVED, Ev.CONT): Step(St.CONTINUED, (Ac.RESUME_HERE,)),
    }
    # Once cancelling, whatever the step in flight ends with, the cancel wins.
    rows |= _rows(
        St.CANCELLING_NO_PEER,
        (Ev.CONNECTED, Ev.HALTED, *_LOCAL, *_ROUND_ENDED),
        Step(St.CANCELLED, _FAIL),
    )
    for state in (*FINAL, St.HANDING_OVER, St.AUDITING, *POSTCOPY_RELEASED, *_CANCELLING):
        rows[(state, Ev.CANCEL)] = Step(state)  # too late, or said already
    return {k: v for k, v in rows.items() if k[0] in STATES[target]}


def _live() -> SourceTable:
    rows = _common(Target.LIVE)
    rows |= {
        (St.SETUP, Ev.CONNECTED): Step(
            St.AWAIT_ACCEPTED, (Ac.SEND_CONFIG, Ac.WATCH_PEER, Ac.AWAIT_ACCEPTED)
        ),
        (St.AWAIT_ACCEPTED, Ev.ACCEPTED): Step(St.PRECOPY, _START_ROUNDS),
        (St.STOP_COPY, Ev.STREAM_ENDED): Step(St.AWAIT_READY, (Ac.AWAIT_READY,)),
        (St.AWAIT_READY, Ev.READY): Step(
            St.HANDING_OVER, (Ac.SEND_GO, Ac.STOP_DIRTY_TRACKING, Ac.AWAIT_RESUMED)
        ),
        (St.HANDING_OVER, Ev.RESUMED): Step(St.COMPLETED, (Ac.REPORT_STATUS, Ac.RELEASE_DEVICES)),
        (St.HANDING_OVER, Ev.RESUMED_UNAUDITED): Step(
            St.AUDITING, (Ac.SEND_AUDIT, Ac.AWAIT_AUDITED)
        ),
        (St.AUDITING, Ev.AUDIT_PASSED): Step(St.COMPLETED, (Ac.REPORT_STATUS, Ac.RELEASE_DEVICES)),
        # The destination stopped its VM: it runs here again, the guest finishes here.
        (St.AUDITING, Ev.AUDIT_FAILED): Step(St.FAILED, _FAIL),
        # It did not start the guest (it gave up waiting for "go"): the VM is only here.
        (St.HANDING_OVER, Ev.DESTINATION_FAILED): Step(St.FAILED, _FAIL),
        (St.PRECOPY, Ev.ROUND_GIVE_UP): Step(St.FAILED, _ABORT),
        (St.AWAIT_ACCEPTED, Ev.CANCEL): Step(St.CANCELLING, _CANCEL),
        (St.PRECOPY, Ev.CANCEL): Step(St.CANCELLING, _CANCEL),
        (St.STOP_COPY, Ev.CANCEL): Step(St.CANCELLING, _CANCEL),
        (St.AWAIT_READY, Ev.CANCEL): Step(St.CANCELLING_AFTER_END, _CANCEL),
        (St.CANCELLING, Ev.STREAM_ENDED): Step(St.CANCELLED, _ABANDON),
    }
    rows |= _postcopy()
    rows |= _rows(St.SETUP, (*_LOCAL, Ev.PEER_SILENT, Ev.PEER_CLOSED), Step(St.FAILED, _FAIL))
    rows |= _rows(
        St.CANCELLING_NO_PEER, (Ev.PEER_SILENT, Ev.PEER_CLOSED), Step(St.CANCELLED, _FAIL)
    )
    for state in (St.AWAIT_ACCEPTED, St.PRECOPY, St.STOP_COPY):
        rows |= _rows(state, _LOCAL, Step(St.FAILED, _ABORT))
        rows |= _rows(state, _PEER_LOST, Step(St.FAILED, _FAIL))
    rows |= _rows(St.AWAIT_READY, _LOCAL, Step(St.FAILED, _ABANDON))
    rows |= _rows(St.AWAIT_READY, _PEER_LOST, Step(St.FAILED, _FAIL))
    lost = (Ev.PEER_SILENT, Ev.PEER_CLOSED, Ev.ERROR)
    rows |= _rows(St.HANDING_OVER, lost, Step(St.FAILED_AFTER_RELEASE, (Ac.REPORT_STATUS,)))
    # Lost during the audit (or a "failed" that does not say it stopped): it may run there.
    rows |= _rows(
        St.AUDITING,
        (*lost, Ev.DESTINATION_FAILED),
        Step(St.FAILED_AFTER_RELEASE, (Ac.REPORT_STATUS,)),
    )
    at_boundary = (Ev.HALTED, *_LOCAL, *_ROUND_ENDED, Ev.ACCEPTED)
    rows |= _rows(St.CANCELLING, at_boundary, Step(St.CANCELLED, _ABORT))
    rows |= _rows(St.CANCELLING, _PEER_LOST, Step(St.CANCELLED, _FAIL))
    rows |= _rows(
        St.CANCELLING_AFTER_END, (Ev.HALTED, *_LOCAL, Ev.READY), Step(St.CANCELLED, _ABANDON)
    )
    rows |= _rows(St.CANCELLING_AFTER_END, _PEER_LOST, Step(St.CANCELLED, _FAIL))
    return MappingProxyType(rows)


def _postcopy() -> _Rows:
    """A live migration's switch to post-copy and what follows it."""
    landed = (Ac.REPORT_STATUS, Ac.RELEASE_DEVICES)
    rows: _Rows = {
        (St.PRECOPY, Ev.ROUND_POSTCOPY): Step(St.POSTCOPY_SWITCH, _POSTCOPY_SWITCH),
        (St.POSTCOPY_SWITCH, Ev.STREAM_ENDED): Step(St.POSTCOPY_AWAIT_READY, (Ac.AWAIT_READY,)),
        (St.POSTCOPY_AWAIT_READY, Ev.READY): Step(
            St.POSTCOPY_HANDING_OVER,
            (Ac.SEND_GO, Ac.STOP_DIRTY_TRACKING, Ac.SERVE_PAGES, Ac.AWAIT_RESUMED),
        ),
        (St.POSTCOPY_SWITCH, Ev.CANCEL): Step(St.CANCELLING, _CANCEL),
        (St.POSTCOPY_AWAIT_READY, Ev.CANCEL): Step(St.CANCELLING_AFTER_END, _CANCEL),
        # It did not start the guest (it gave up waiting for "go"): the VM is only here.
        (St.POSTCOPY_HANDING_OVER, Ev.DESTINATION_FAILED): Step(St.FAILED, _FAIL),
        (St.POSTCOPY_ACTIVE, Ev.PAGES_LANDED): Step(St.COMPLETED, landed),
        (St.POSTCOPY_ACTIVE, Ev.PAGES_LANDED_UNAUDITED): Step(
            St.POSTCOPY_AUDITING, (Ac.SEND_AUDIT, Ac.AWAIT_AUDITED)
        ),
        (St.POSTCOPY_AUDITING, Ev.AUDIT_PASSED): Step(St.COMPLETED, landed),
        # The destination stopped its VM, but ran it since the switch (its DMA, its
        # frames out): run here from the switch, its outside effects would come twice.
        # Failed, paused here, its memory kept until quit.
        (St.POSTCOPY_AUDITING, Ev.AUDIT_FAILED): Step(St.FAILED_AFTER_RELEASE, (Ac.REPORT_STATUS,)),
    }
    resumed = Step(St.POSTCOPY_ACTIVE, (Ac.AWAIT_LANDED,))  # postcopy-active already
    rows |= _rows(St.POSTCOPY_HANDING_OVER, (Ev.RESUMED, Ev.RESUMED_UNAUDITED), resumed)
    rows |= _rows(St.POSTCOPY_SWITCH, _LOCAL, Step(St.FAILED, _ABORT))
    rows |= _rows(St.POSTCOPY_SWITCH, _PEER_LOST, Step(St.FAILED, _FAIL))
    rows |= _rows(St.POSTCOPY_AWAIT_READY, _LOCAL, Step(St.FAILED, _ABANDON))
    rows |= _rows(St.POSTCOPY_AWAIT_READY, _PEER_LOST, Step(St.FAILED, _FAIL))
    # After "go" the VM's state is split: lost there, it is lost (the source keeps its
    # memory until quit); a "failed" after the resume says the same.
    lost = Step(St.FAILED_AFTER_RELEASE, (Ac.REPORT_STATUS,))
    rows |= _rows(St.POSTCOPY_HANDING_OVER, (Ev.PEER_SILENT, Ev.PEER_CLOSED, Ev.ERROR), lost)
    rows |= _rows(St.POSTCOPY_ACTIVE, (*_PEER_LOST, Ev.ERROR), lost)
    rows |= _rows(St.POSTCOPY_AUDITING, (*_PEER_LOST, Ev.ERROR), lost)
    # A link reset or silent (not closed): both sides wait for a new one (migrate resume
    # here, migrate-recover there), nothing lost; the pages go on where they stopped.
    rows[(St.POSTCOPY_ACTIVE, Ev.LINK_BROKEN)] = Step(
        St.POSTCOPY_PAUSED, (Ac.REPORT_STATUS, Ac.AWAIT_RESUME)
    )
    rows[(St.POSTCOPY_PAUSED, Ev.LINK_RESUMED)] = Step(
        St.POSTCOPY_ACTIVE, (Ac.REPORT_STATUS, Ac.AWAIT_LANDED)
    )
    rows |= _rows(St.POSTCOPY_PAUSED, (*_PEER_LOST, Ev.ERROR, Ev.GUEST_ENDED), lost)
    return rows


def _file() -> SourceTable:
    rows = _common(Target.FILE)
    rows |= {
        (St.SETUP, Ev.CONNECTED): Step(St.PRECOPY, (Ac.SEND_CONFIG, *_START_ROUNDS)),
        (St.STOP_COPY, Ev.STREAM_ENDED): Step(St.SAVED, _SAVE),
        # The file was whole before the cancel was seen: it stands, as QEMU's would.
        (St.CANCELLING_NO_PEER, Ev.STREAM_ENDED): Step(St.SAVED, _SAVE),
        (St.PRECOPY, Ev.ROUND_GIVE_UP): Step(St.FAILED, _FAIL),
    }
    for state in (St.SETUP, St.PRECOPY, St.STOP_COPY):
        rows |= _rows(state, _LOCAL, Step(St.FAILED, _FAIL))
        if state is not St.SETUP:
            rows[(state, Ev.CANCEL)] = Step(St.CANCELLING_NO_PEER, _CANCEL)
    return MappingProxyType(rows)


#: The table for each kind of target.
TABLES: Mapping[Target, SourceTable] = MappingProxyType(
    {Target.LIVE: _live(), Target.FILE: _file()}
)

_ROUND_EVENTS: Mapping[str, SourceEvent] = MappingProxyType(
    {
        "continue": Ev.ROUND_CONTINUE,
        "switchover": Ev.ROUND_SWITCHOVER,
        "cancel": Ev.ROUND_GIVE_UP,
        "postcopy": Ev.ROUND_POSTCOPY,
    }
)
_REPLY_EVENTS: Mapping[str, SourceEvent] = MappingProxyType(
    {
        "accepted": Ev.ACCEPTED,
        "ready": Ev.READY,
        "resumed": Ev.RESUMED,
        "failed": Ev.DESTINATION_FAILED,
    }
)


def round_ended(decision: str) -> SourceEvent:
    """The event for the policy's decision at a round's end (``policy.Decision.action``)."""
    try:
        return _ROUND_EVENTS[decision]
    except KeyError:
        raise MigrationError(f"the policy decided {decision!r}, not a known action") from None


def reply_event(kind: str) -> SourceEvent:
    """The event for a line on the reply path (heartbeats are the watch's, not events)."""
    try:
        return _REPLY_EVENTS[kind]
    except KeyError:
        raise MigrationError(f"the destination sent an unknown reply {kind!r}") from None


class SourceMachine(Walk[SourceState, SourceEvent, SourceAction]):
    """One outgoing migration's place in its table."""

    def __init__(self, target: Target) -> None:
        name = f"{target.value} migration source"
        super().__init__(name, TABLES[target], STATUS, St.IDLE, final=FINAL, phases=PHASE)
        self.target = target

    @property
    def released(self) -> bool:
        """The VM must not run here on its own (a cancel is ignored)."""
        return self.state in RELEASED

    @property
    def resumable(self) -> bool:
        """``cont`` may run the VM here again: it was saved to a file."""
        return self.state is St.SAVED

    @property
    def postcopy(self) -> bool:
        """The migration switched to post-copy (or is switching)."""
        return self.state in POSTCOPY

    @property
    def cancelling(self) -> bool:
        return self.state in _CANCELLING


__all__ = [
    "FINAL",
    "PHASE",
    "POSTCOPY",
    "POSTCOPY_RELEASED",
    "RELEASED",
    "ROLLBACK_AFTER_RELEASE",
    "STATES",
    "STATUS",
    "TABLES",
    "SourceAction",
    "SourceEvent",
    "SourceMachine",
    "SourceState",
    "SourceTable",
    "Target",
    "reply_event",
    "round_ended",
]
