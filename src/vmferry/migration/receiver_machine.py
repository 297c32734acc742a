"""The destination of a live migration as a table: (state, event) → next state, actions.

It waits for a source (WAITING: "setup"), refusing strangers and listening on; reads the
CONF (AWAIT_CONF) and sets up RAM, devices and the extra channels (SETTING_UP); says
``accepted`` and loads the main stream section by section (LOADING while rounds of RAM,
RND and DEVD come, then AFTER_CPUS, AFTER_DEVS, AFTER_VRFY: all "active"); after END it
finishes the load and verifies (VERIFYING), says ``ready`` and waits for ``go`` (READY),
then starts the guest and says ``resumed`` (RUNNING: "completed"). With x-verify on the
source audits after the resume (AUDITING, still "active": the guest runs here, the source
keeps its copy): its digests of all RAM are compared with the digests taken here as each
page landed; passed → RUNNING; a mismatch (or a bad audit) stops the guest here, drops
what it sent if its output was held, tells the source (which runs the VM again) and
discards the VM (FAILED); a source lost meanwhile leaves the guest running here,
unaudited: the source keeps its copy paused. Until the guest runs,
an ABRT section, an ``abandon`` line, a silent or vanished source and any failure here
end in FAILED: the source is told on the reply path and what was loaded is discarded, so
no guest ever starts from a stream not read to its end and verified. Once it runs,
nothing the source says or does stops it: such events are taken and change nothing.

The section events follow the main stream's grammar exactly (``stream.MAIN_GRAMMAR``,
checked by the tests): this table decides which section may come next; the stream
reader's own check stays until the codec takes it over. Extra channels (CHAN, RAM, CEND)
are read by the driver's channel readers and joined in FINISH_LOAD. The driver turns a
section header into an event with ``section_event``, a reply-path line with
``reply_event``, and performs the actions in order; READ_SECTION, SET_UP, VERIFY,
AWAIT_SOURCE and AWAIT_GO yield the next event. A save file restored here (Target.FILE)
walks the same sections without a source: no heartbeat, no ``accepted``, ``ready`` or
``go``; a verified load starts the guest.

Post-copy: after DEVS (and VRFY) a PCPY section names the pages this side must not
trust (AFTER_PCPY); at END the load finishes and post-copy is prepared — the owed pages
discarded, guest RAM registered with userfaultfd, the page channels accepted, the fault
server started — before the check and ``ready``. On ``go`` the devices' DMA is gated and
the guest starts on RAM that is partly missing (POSTCOPY_ACTIVE: "postcopy-active");
when the last owed page has landed post-copy ends (RAM unregistered, DMA ungated,
``landed`` said), then the audit (x-verify on: POSTCOPY_AUDITING) or RUNNING. A source
lost before the last page stops the guest here: it cannot run on without its pages.

Its drivers: ``reception.Reception`` (a live destination), ``loader.SectionLoop`` (the
sections after CONF, for both) and ``restore.restore_from_file`` (a file).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from vmferry.errors import MigrationError, StreamError
from vmferry.migration.receiver_events import ReceiverAction, ReceiverEvent, ReceiverState
from vmferry.migration.source_machine import Target
from vmferry.migration.status import MigrationStatus
from vmferry.migration.table import Step, Walk

Rs, Re, Ra = ReceiverState, ReceiverEvent, ReceiverAction
ReceiverTable = Mapping[tuple[ReceiverState, ReceiverEvent], Step[ReceiverState, ReceiverAction]]

#: A source is connected: from the wait for CONF to the hand-over.
_CONNECTED = (
    Rs.AWAIT_CONF,
    Rs.SETTING_UP,
    Rs.LOADING,
    Rs.AFTER_CPUS,
    Rs.AFTER_DEVS,
    Rs.AFTER_VRFY,
    Rs.AFTER_PCPY,
    Rs.VERIFYING,
    Rs.READY,
)
_POSTCOPY_RUNNING = (Rs.POSTCOPY_ACTIVE, Rs.POSTCOPY_AUDITING, Rs.POSTCOPY_PAUSED)

STATUS: Mapping[ReceiverState, MigrationStatus] = MappingProxyType(
    {
        Rs.IDLE: MigrationStatus.NONE,
        Rs.WAITING: MigrationStatus.SETUP,
        **{s: MigrationStatus.ACTIVE for s in _CONNECTED},
        Rs.AUDITING: MigrationStatus.ACTIVE,  # not done until the audit passed
        **{s: MigrationStatus.POSTCOPY_ACTIVE for s in _POSTCOPY_RUNNING},
        Rs.POSTCOPY_PAUSED: MigrationStatus.POSTCOPY_PAUSED,
        Rs.RUNNING: MigrationStatus.COMPLETED,
        Rs.FAILED: MigrationStatus.FAILED,
    }
)

#: What was being read, for "the source closed the connection during …".
PHASE: Mapping[ReceiverState, str] = MappingProxyType(
    {
        Rs.WAITING: "the wait for a source",
        Rs.AWAIT_CONF: "the set-up",
        Rs.SETTING_UP: "the set-up",
        Rs.LOADING: "the rounds",
        Rs.AFTER_CPUS: "the switchover",
        Rs.AFTER_DEVS: "the switchover",
        Rs.AFTER_VRFY: "the switchover",
        Rs.AFTER_PCPY: "the switchover",
        Rs.POSTCOPY_ACTIVE: "post-copy",
        Rs.POSTCOPY_AUDITING: "the audit after post-copy",
        Rs.POSTCOPY_PAUSED: "post-copy (paused)",
        Rs.VERIFYING: "the verification",
        Rs.READY: "the wait for the hand-over",
        Rs.AUDITING: "the audit after resume",
    }
)

#: Main-stream sections, as events (an event is named as its section's tag).
SECTION_EVENTS: Mapping[bytes, ReceiverEvent] = MappingProxyType(
    {
        e.name.encode().ljust(4, b"\0"): e
        for e in (
            Re.CONF,
            Re.RAM,
            Re.RND,
            Re.DEVD,
            Re.CPUS,
            Re.DEVS,
            Re.VRFY,
            Re.END,
            Re.ABRT,
            Re.PCPY,
        )
    }
)

_FAIL = (Ra.STOP_HEARTBEAT, Ra.SEND_FAILED, Ra.DISCARD, Ra.REPORT_STATUS)
_READING = (Rs.LOADING, Rs.AFTER_CPUS, Rs.AFTER_DEVS, Rs.AFTER_VRFY, Rs.AFTER_PCPY)
_GIVE_UP = (Re.ABANDON, Re.ERROR, Re.SOURCE_SILENT, Re.SOURCE_CLOSED)
_READ = Ra.READ_SECTION
_FINISH = Step(Rs.VERIFYING, (Ra.FINISH_LOAD, Ra.VERIFY))
_STOP = Step(
    Rs.FAILED,
    (
        Ra.STOP_VM,
        Ra.DROP_OUTPUT,
        Ra.SEND_AUDITED,
        Ra.STOP_HEARTBEAT,
        Ra.DISCARD,
        Ra.REPORT_STATUS,
    ),
)


_Rows = dict[tuple[ReceiverState, ReceiverEvent], Step[ReceiverState, ReceiverAction]]
_SECTION_ROWS: _Rows = {
    (Rs.AWAIT_CONF, Re.CONF): Step(Rs.SETTING_UP, (Ra.SET_UP,)),
    (Rs.LOADING, Re.RAM): Step(Rs.LOADING, (Ra.LOAD_RAM, _READ)),
    (Rs.LOADING, Re.RND): Step(Rs.LOADING, (Ra.END_ROUND, _READ)),
    (Rs.LOADING, Re.DEVD): Step(Rs.LOADING, (Ra.LOAD_DEVICE_DATA, _READ)),
    (Rs.LOADING, Re.CPUS): Step(Rs.AFTER_CPUS, (Ra.LOAD_CPU_STATE, _READ)),
    (Rs.AFTER_CPUS, Re.DEVS): Step(Rs.AFTER_DEVS, (Ra.LOAD_DEVICE_SUMMARY, _READ)),
    (Rs.AFTER_DEVS, Re.VRFY): Step(Rs.AFTER_VRFY, (Ra.LOAD_DIGESTS, _READ)),
    (Rs.AFTER_DEVS, Re.END): _FINISH,
    (Rs.AFTER_VRFY, Re.END): _FINISH,
}


def _postcopy() -> _Rows:
    """The PCPY section and what follows it: a guest that runs while its pages come."""
    owed = Step(Rs.AFTER_PCPY, (Ra.LOAD_OWED, _READ))
    audited_end = (Ra.SEND_AUDITED, Ra.RELEASE_OUTPUT, Ra.STOP_HEARTBEAT, Ra.REPORT_STATUS)
    rows: _Rows = {
        (Rs.AFTER_DEVS, Re.PCPY): owed,
        (Rs.AFTER_VRFY, Re.PCPY): owed,
        (Rs.AFTER_PCPY, Re.END): Step(
            Rs.VERIFYING, (Ra.FINISH_LOAD, Ra.PREPARE_POSTCOPY, Ra.VERIFY)
        ),
        (Rs.READY, Re.GO_POSTCOPY): Step(
            Rs.POSTCOPY_ACTIVE,
            (
                Ra.HOLD_OUTPUT,
                Ra.GATE_DMA,
                Ra.START_VM,
                Ra.REPORT_STATUS,
                Ra.SEND_RESUMED,
                Ra.AWAIT_LANDED,
            ),
        ),
        (Rs.POSTCOPY_ACTIVE, Re.LANDED): Step(
            Rs.RUNNING,
            (
                Ra.END_POSTCOPY,
                Ra.SEND_LANDED,
                Ra.RELEASE_OUTPUT,
                Ra.STOP_HEARTBEAT,
                Ra.REPORT_STATUS,
            ),
        ),
        (Rs.POSTCOPY_ACTIVE, Re.LANDED_UNAUDITED): Step(
            Rs.POSTCOPY_AUDITING, (Ra.END_POSTCOPY, Ra.SEND_LANDED, Ra.AWAIT_AUDIT)
        ),
        (Rs.POSTCOPY_AUDITING, Re.AUDIT_PASSED): Step(Rs.RUNNING, audited_end),
        (Rs.POSTCOPY_AUDITING, Re.AUDIT_FAILED): _STOP,
        (Rs.POSTCOPY_AUDITING, Re.ERROR): _STOP,
    }
    # The guest cannot run on without its pages: stopped, and the source told.
    lost = Step(
        Rs.FAILED,
        (
            Ra.STOP_VM,
            Ra.END_POSTCOPY,
            Ra.DROP_OUTPUT,
            Ra.STOP_HEARTBEAT,
            Ra.SEND_FAILED,
            Ra.DISCARD,
            Ra.REPORT_STATUS,
        ),
    )
    unaudited = Step(
        Rs.RUNNING, (Ra.KEEP_UNAUDITED, Ra.RELEASE_OUTPUT, Ra.STOP_HEARTBEAT, Ra.REPORT_STATUS)
    )
    for event in _GIVE_UP:
        rows[(Rs.POSTCOPY_ACTIVE, event)] = lost
        rows[(Rs.POSTCOPY_PAUSED, event)] = lost
    # Reset or silent, not closed: the guest waits (vCPUs on missing pages stay parked)
    # for a new link; the pages go on where they stopped.
    rows[(Rs.POSTCOPY_ACTIVE, Re.LINK_BROKEN)] = Step(
        Rs.POSTCOPY_PAUSED, (Ra.REPORT_STATUS, Ra.AWAIT_RECOVER)
    )
    rows[(Rs.POSTCOPY_PAUSED, Re.RECOVERED)] = Step(
        Rs.POSTCOPY_ACTIVE, (Ra.REPORT_STATUS, Ra.AWAIT_LANDED)
    )
    for event in (Re.ABANDON, Re.SOURCE_SILENT, Re.SOURCE_CLOSED):
        rows[(Rs.POSTCOPY_AUDITING, event)] = unaudited
    return rows


def _live() -> ReceiverTable:
    rows: _Rows = {
        **_SECTION_ROWS,
        **_postcopy(),
        (Rs.IDLE, Re.START): Step(Rs.WAITING, (Ra.REPORT_STATUS, Ra.AWAIT_SOURCE)),
        (Rs.IDLE, Re.ABANDON): Step(Rs.FAILED, (Ra.REPORT_STATUS,)),
        (Rs.IDLE, Re.ERROR): Step(Rs.FAILED, (Ra.REPORT_STATUS,)),
        (Rs.WAITING, Re.CONNECTED): Step(
            Rs.AWAIT_CONF, (Ra.REPORT_STATUS, Ra.START_HEARTBEAT, _READ)
        ),
        (Rs.WAITING, Re.STRANGER): Step(Rs.WAITING, (Ra.REFUSE_CONNECTION, Ra.AWAIT_SOURCE)),
        # No source yet: nobody to tell, nothing built but what preallocation made.
        (Rs.WAITING, Re.ABANDON): Step(Rs.FAILED, (Ra.DISCARD, Ra.REPORT_STATUS)),
        (Rs.WAITING, Re.ERROR): Step(Rs.FAILED, (Ra.DISCARD, Ra.REPORT_STATUS)),
        (Rs.SETTING_UP, Re.SET_UP): Step(Rs.LOADING, (Ra.SEND_ACCEPTED, _READ)),
        (Rs.VERIFYING, Re.VERIFY_PASSED): Step(Rs.READY, (Ra.SEND_READY, Ra.AWAIT_GO)),
        (Rs.VERIFYING, Re.VERIFY_FAILED): Step(Rs.FAILED, _FAIL),
        (Rs.READY, Re.GO): Step(
            Rs.RUNNING,
            (Ra.START_VM, Ra.REPORT_STATUS, Ra.SEND_RESUMED, Ra.STOP_HEARTBEAT),
        ),
        (Rs.FAILED, Re.ABANDON): Step(Rs.FAILED),  # said already
        (Rs.READY, Re.GO_UNAUDITED): Step(
            Rs.AUDITING, (Ra.HOLD_OUTPUT, Ra.START_VM, Ra.SEND_RESUMED, Ra.AWAIT_AUDIT)
        ),
        (Rs.AUDITING, Re.AUDIT_PASSED): Step(
            Rs.RUNNING,
            (Ra.SEND_AUDITED, Ra.RELEASE_OUTPUT, Ra.STOP_HEARTBEAT, Ra.REPORT_STATUS),
        ),
    }
    # A mismatch, or an audit that cannot be read: the guest stops here and the source,
    # told so, runs it again.
    rows |= dict.fromkeys(((Rs.AUDITING, Re.AUDIT_FAILED), (Rs.AUDITING, Re.ERROR)), _STOP)
    for event in (Re.ABANDON, Re.SOURCE_SILENT, Re.SOURCE_CLOSED):
        rows[(Rs.AUDITING, event)] = Step(
            Rs.RUNNING,
            (Ra.KEEP_UNAUDITED, Ra.RELEASE_OUTPUT, Ra.STOP_HEARTBEAT, Ra.REPORT_STATUS),
        )
    for state in _CONNECTED:
        for event in _GIVE_UP:
            rows[(state, event)] = Step(Rs.FAILED, _FAIL)
    for state in _READING:
        rows[(state, Re.ABRT)] = Step(Rs.FAILED, _FAIL)
    # The source was released by "go": the guest is this one now, whatever the source does.
    for event in (Re.ABANDON, Re.SOURCE_SILENT, Re.SOURCE_CLOSED):
        rows[(Rs.RUNNING, event)] = Step(Rs.RUNNING)
    return MappingProxyType(rows)


def _file() -> ReceiverTable:
    """A save file restored here: the same sections, nobody to answer, nothing to wait
    for; a file that ends early or holds garbage is an ERROR (the reader's StreamError)."""
    discard = (Ra.DISCARD, Ra.REPORT_STATUS)
    rows: _Rows = {
        **_SECTION_ROWS,
        (Rs.IDLE, Re.START): Step(Rs.AWAIT_CONF, (Ra.REPORT_STATUS, _READ)),
        (Rs.IDLE, Re.ABANDON): Step(Rs.FAILED, (Ra.REPORT_STATUS,)),
        (Rs.IDLE, Re.ERROR): Step(Rs.FAILED, (Ra.REPORT_STATUS,)),
        (Rs.SETTING_UP, Re.SET_UP): Step(Rs.LOADING, (_READ,)),
        (Rs.VERIFYING, Re.VERIFY_PASSED): Step(Rs.RUNNING, (Ra.START_VM, Ra.REPORT_STATUS)),
        (Rs.VERIFYING, Re.VERIFY_FAILED): Step(Rs.FAILED, discard),
        (Rs.FAILED, Re.ABANDON): Step(Rs.FAILED),
        (Rs.RUNNING, Re.ABANDON): Step(Rs.RUNNING),
    }
    for state in STATES[Target.FILE] - {Rs.IDLE, Rs.RUNNING, Rs.FAILED}:
        rows[(state, Re.ABANDON)] = rows[(state, Re.ERROR)] = Step(Rs.FAILED, discard)
    for state in _READING[:-1]:  # no PCPY in a file
        rows[(state, Re.ABRT)] = Step(Rs.FAILED, discard)
    return MappingProxyType(rows)


#: The states each kind of incoming goes through: a file has no source to wait for.
STATES: Mapping[Target, frozenset[ReceiverState]] = MappingProxyType(
    {
        Target.LIVE: frozenset(ReceiverState),
        Target.FILE: frozenset(ReceiverState)
        - {Rs.WAITING, Rs.READY, Rs.AUDITING, Rs.AFTER_PCPY, *_POSTCOPY_RUNNING},
    }
)
TABLES: Mapping[Target, ReceiverTable] = MappingProxyType(
    {Target.LIVE: _live(), Target.FILE: _file()}
)
TABLE: ReceiverTable = TABLES[Target.LIVE]
FINAL: frozenset[ReceiverState] = frozenset({Rs.RUNNING, Rs.FAILED})

_REPLY_EVENTS: Mapping[str, ReceiverEvent] = MappingProxyType({"go": Re.GO, "abandon": Re.ABANDON})


def section_event(tag: bytes) -> ReceiverEvent:
    """The event for a main-stream section header's tag."""
    try:
        return SECTION_EVENTS[tag]
    except KeyError:
        name = tag.rstrip(b"\0").decode("ascii", "replace")
        raise StreamError(f"a {name} section has no place in the main stream") from None


def reply_event(kind: str) -> ReceiverEvent:
    """The event for a line from the source on the reply path."""
    try:
        return _REPLY_EVENTS[kind]
    except KeyError:
        raise MigrationError(f"the source did not hand over: it sent {kind!r}") from None


class ReceiverMachine(Walk[ReceiverState, ReceiverEvent, ReceiverAction]):
    """One incoming migration's (or restored file's) place in its table."""

    def __init__(self, target: Target = Target.LIVE) -> None:
        name = "migration destination" if target is Target.LIVE else "restore from a file"
        super().__init__(name, TABLES[target], STATUS, Rs.IDLE, final=FINAL, phases=PHASE)
        self.target = target

    @property
    def started(self) -> bool:
        """The guest was started here (in AUDITING only a failed audit may stop it)."""
        return self.state in (Rs.RUNNING, Rs.AUDITING, *_POSTCOPY_RUNNING)

    @property
    def postcopy(self) -> bool:
        """The guest runs here while owed pages still come, or they came and it is audited."""
        return self.state in _POSTCOPY_RUNNING


__all__ = [
    "FINAL",
    "PHASE",
    "SECTION_EVENTS",
    "STATES",
    "STATUS",
    "TABLE",
    "TABLES",
    "ReceiverAction",
    "ReceiverEvent",
    "ReceiverMachine",
    "ReceiverState",
    "ReceiverTable",
    "reply_event",
    "section_event",
]
