"""One incoming migration, driven by the receiver's table (``receiver_machine``).

``Reception`` is the driver: it steps a ``ReceiverMachine`` (Target.LIVE) and carries out
the actions each step returns; an action that yields (accept, read a section, set up,
verify, wait for ``go``) turns what it saw into the next event. From the first section
after CONF to END, ``loader.SectionLoop`` drives the same walk (a restored file shares
it). A failure in any action is raised there and turned into its event here (the source
gave up, closed, went silent, or something failed on this side), so the table decides
what happens then too: the source is told, what was built is discarded. Once the guest
runs, nothing closes it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import BinaryIO, Protocol

from vmferry.errors import MigrationError
from vmferry.machine.machine import Machine
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.audit import AuditComparison
from vmferry.migration.audit_side import (
    await_audit,
    drop_output,
    hold_output,
    keep_unaudited,
    release_output,
    send_audited,
    stop_vm,
)
from vmferry.migration.channel import MigrationUri, ReplyPath
from vmferry.migration.codec import (
    Abandon,
    Accepted,
    ConfigRecord,
    Failed,
    Go,
    Ready,
    Resumed,
)
from vmferry.migration.connector import Acceptor
from vmferry.migration.devices import DestinationDevices
from vmferry.migration.incoming import (
    CHANNEL_ACCEPT_TIMEOUT_S,
    DEFAULT_PEER_TIMEOUT_S,
    Connection,
    IncomingResult,
    address,
    failure_event,
    not_a_stream,
    peer_timeout,
    postcopy_unavailable,
    reported,
    verify_dict,
    wake,
)
from vmferry.migration.loader import (
    LOADING_ACTIONS,
    LoadedStream,
    abandoned,
    check_loaded,
    load_stream,
    open_devices,
    populate,
)
from vmferry.migration.metrics import VerifyResult
from vmferry.migration.postcopy.destination_side import PostcopyDestination
from vmferry.migration.postcopy.receiving import (
    await_landed,
    await_recover,
    end_postcopy,
    gate_dma,
    prepare_postcopy,
    send_landed,
)
from vmferry.migration.receiver_machine import (
    ReceiverAction,
    ReceiverEvent,
    ReceiverMachine,
    ReceiverState,
)
from vmferry.migration.source_machine import Target
from vmferry.migration.status import MigrationStatus
from vmferry.migration.stream import StreamReader
from vmferry.migration.tls import TlsServer


class Waiting(Protocol):
    """What the driver needs of the destination that waits (``IncomingMigration``), so
    that this module does not import it back."""

    uri: MigrationUri
    port: int
    announce: bool
    acceptor: Acceptor
    tls: TlsServer | None
    kvm_device: str
    serial: BinaryIO | None
    device_versions: dict[str, int]
    status: MigrationStatus
    on_connected: Callable[[], None] | None
    refusals: list[str]

    def take_prealloc(self) -> GuestMemory | None: ...

    def memory_for(self, size: int) -> GuestMemory: ...


log = logging.getLogger(__name__)
Rs, Re, Ra = ReceiverState, ReceiverEvent, ReceiverAction

# Where "the source closed the connection during round N" names the round: the stream.
_IN_ROUNDS = frozenset({Rs.LOADING, Rs.AFTER_CPUS, Rs.AFTER_DEVS, Rs.AFTER_VRFY, Rs.VERIFYING})
# What the table does on a failure, for the one failure it has no row for: the start of
# the guest itself (the walk is RUNNING, the guest is not).
_FAILED_START = (Ra.STOP_HEARTBEAT, Ra.SEND_FAILED, Ra.DISCARD)


class Reception:
    """One ``receive``: the walk, what it has built so far, and the failure if any."""

    def __init__(self, incoming: Waiting) -> None:
        self.incoming = incoming
        self.walk = ReceiverMachine(Target.LIVE)
        self.timeout_s = DEFAULT_PEER_TIMEOUT_S
        self.socks: list[socket.socket] = []
        self.conn: Connection | None = None
        self.stranger: tuple[socket.socket | None, str, str] | None = None
        self._head: ConfigRecord | None = None
        self.channels: list[StreamReader] = []
        self.memory: GuestMemory | None = None
        self.devices: DestinationDevices | None = None
        self.machine: Machine | None = None
        self.loaded: LoadedStream | None = None
        self.verify: VerifyResult | None = None
        self.failed_check: VerifyResult | None = None  # the verification that refused it
        self.running = False  # the guest runs here: from then on nothing may close it
        self.guest_started = False  # its start began: the source must never run it again
        self.cause: BaseException | None = None  # what failed, as it was raised
        self.error: BaseException | None = None  # and as the destination reports it
        self.times: dict[str, float] = {}
        self.audit: AuditComparison | None = None  # x-verify on, after the resume
        # After a failed audit (audit_side.py): why the stopped VM must be kept rather
        # than discarded (the source may not know), why it could not be stopped, and
        # whether DISCARD leaves it.
        self.keep_stopped = ""
        self.stop_failed = ""
        self.keep_vm = False
        self.postcopy: PostcopyDestination | None = None  # post-copy's, once prepared

    # ---- the walk
    def run(self) -> IncomingResult:
        try:
            self._walk()
        finally:
            self._release()
        if self.error is not None:  # the walk failed (or the guest could not start)
            assert self.cause is not None
            if self.error is self.cause:
                raise self.error
            raise self.error from self.cause
        return self._result()

    def _walk(self) -> None:
        event: ReceiverEvent | None = Re.START
        while event is not None:
            try:
                event = self._perform_all(self.walk.step(event))
            except BaseException as e:
                auditing = self.walk.state is Rs.AUDITING or self.walk.postcopy
                if self.walk.finished or (self.running and not auditing):
                    raise  # nothing after the start raises; never close a running guest
                if self.walk.started and not self.running:  # its start failed: no row
                    self._fail(e)
                    self._perform_all(_FAILED_START)
                    return
                event = self._fail(e)

    def _perform_all(self, actions: tuple[ReceiverAction, ...]) -> ReceiverEvent | None:
        event = None
        for action in actions:
            event = self._ACTIONS[action](self) or event
        return event

    def _fail(self, e: BaseException) -> ReceiverEvent:
        """Keep the failure, in the words the destination reports it with; its event."""
        event = failure_event(e)
        if not self.walk.allows(event):
            event = Re.ERROR  # e.g. a connection reset before there is a source
        err = reported(e, event, self._during(), self.timeout_s)
        self.cause, self.error = e, err
        return event

    def _during(self) -> str:
        if self.walk.state in _IN_ROUNDS and self.conn is not None:
            return f"round {self.conn.budget.round}"
        return self.walk.phase

    def _release(self) -> None:
        end_postcopy(self)  # after a failure that had no row (else done already)
        if self.conn is not None:
            self.conn.heartbeat.stop()
        if (memory := self.incoming.take_prealloc()) is not None:
            memory.close()
        for s in self.socks:
            wake(s)  # a channel thread blocked on its socket returns now
            s.close()
        self.incoming.acceptor.close()

    def _result(self) -> IncomingResult:
        assert self.machine is not None and self.loaded is not None and self.verify is not None
        t = self.times
        return IncomingResult(
            self.machine,
            self.verify,
            t["loaded"] - t["t0"],
            self.loaded.rounds,
            self.loaded.ram.normal + self.loaded.ram.zero,
            {"load_s": t["loaded"] - t["t0"], "verify_s": t["verified"] - t["loaded"]},
            {} if self.postcopy is None else self.postcopy.figures(),
        )

    # ---- before the stream: a source, or a stranger
    def _report_status(self) -> None:
        status = self.incoming.status = self.walk.status
        if status is MigrationStatus.SETUP and self.incoming.announce:
            where = f"{self.incoming.uri.host}:{self.incoming.port}"
            print(f"vmferry: waiting for a migration on {where}", file=sys.stderr, flush=True)
        elif status is MigrationStatus.ACTIVE and self.incoming.on_connected is not None:
            # The wait (QEMU's "setup") is over: a source connected and was admitted.
            self.incoming.on_connected()

    def _await_source(self) -> ReceiverEvent:
        """The next connection: the source's, or a stranger's (refused before it
        authenticated with TLS, or before its CONF when it is not a vmferry stream)."""
        conn = self.incoming.acceptor.accept(None, "source")
        peer = address(conn)
        try:
            sock = self._secure(conn, "source")
        except (MigrationError, OSError) as e:
            conn.close()
            self.stranger = (None, peer, str(e))
            return Re.STRANGER
        if self.incoming.tls is None and (garbage := not_a_stream(sock)):
            self.stranger = (sock, peer, garbage)
            return Re.STRANGER
        self.socks.append(sock)
        self.conn = Connection(sock, self.timeout_s)
        return Re.CONNECTED

    def _refuse_connection(self) -> None:
        assert self.stranger is not None
        sock, peer, why = self.stranger
        self.stranger = None
        line = f"refused a connection from {peer}: {why.removeprefix('refused a migration: ')}"
        self.incoming.refusals.append(line)
        print(f"vmferry: {line}", file=sys.stderr, flush=True)
        if sock is not None:  # a plain stranger is told why, as a source would read it
            with contextlib.suppress(OSError):
                ReplyPath(sock).send(Failed(why))
            wake(sock)
            sock.close()

    def _start_heartbeat(self) -> None:
        assert self.conn is not None
        self.conn.heartbeat.start()
        self.times["t0"] = time.monotonic()

    def _secure(self, sock: socket.socket, what: str) -> socket.socket:
        tls = self.incoming.tls  # when set, every connection is TLS with an admitted client
        return sock if tls is None else tls.secure(sock, what)

    # ---- the set-up
    @property
    def head(self) -> ConfigRecord:
        assert self._head is not None, "no CONF read yet"
        return self._head

    def _read_section(self) -> ReceiverEvent | None:
        assert self.conn is not None
        if self.walk.state is Rs.AWAIT_CONF:
            self._head = self.conn.read_head()
            return Re.CONF
        return self._load()

    def _set_up(self) -> ReceiverEvent:
        """The peer timeout the CONF says, the extra channels, guest RAM, devices."""
        assert self.conn is not None
        head, conn = self.head, self.conn
        conn.budget.allow(head)
        self.timeout_s = peer_timeout(head.peer_timeout_ms)
        conn.rebound(self.timeout_s)
        for i in range(1, head.channels):
            what = f"channel {i}"
            s = self._secure(self.incoming.acceptor.accept(CHANNEL_ACCEPT_TIMEOUT_S, what), what)
            self.socks.append(s)
            self.channels.append(conn.channel(s, i, self.timeout_s))
        self.memory = self.incoming.memory_for(head.config.memory)
        populate(self.memory, head.resident, head.channels)  # no-op on pre-allocated RAM
        self.devices = open_devices(head, self.memory, self.incoming.device_versions)
        return Re.SET_UP

    def _send_accepted(self) -> None:
        assert self.conn is not None
        # Said now, before anything moves: the source refuses a switch this side cannot take.
        self.conn.reply.send(Accepted(postcopy=postcopy_unavailable()))

    # ---- the stream
    def _load(self) -> ReceiverEvent | None:
        """The section loop drives the walk from here to the end of the stream; what it
        leaves to do (the verification) is done here."""
        assert self.conn is not None and self.memory is not None
        sock = self.conn.sock
        self.loaded = load_stream(
            self.head,
            self.conn.stream,
            self.memory,
            self.channels,
            self.devices,
            wake_main=lambda: wake(sock),
            on_round=self.conn.budget.next_round,
            walk=self.walk,
        )
        return self._perform_all(self.loaded.then)

    def _verify(self) -> ReceiverEvent:
        """Build the machine (it owns RAM and devices from now) and compare what arrived
        with the source's digests."""
        assert self.loaded is not None and self.memory is not None and self.devices is not None
        # The landing digests' drain after END is the check's (it is in the downtime).
        self.times["loaded"] = time.monotonic() - self.loaded.drain_ms / 1e3
        self.machine = Machine.from_state(
            self.loaded.state,
            self.memory,
            kvm_device=self.incoming.kvm_device,
            serial=self.incoming.serial,
            devices=self.devices.devices,
        )
        self.memory = self.devices = None
        self.verify = check_loaded(self.loaded, self.machine)
        self.times["verified"] = time.monotonic()
        self.verify.mode = self.head.verify
        if self.head.verify != "off":
            ms = (self.times["verified"] - self.times["loaded"]) * 1e3
            self.verify.phases["pre-resume"] = {
                "pages": self.verify.pages_checked,
                "ms": round(ms, 3),
                "drain_ms": round(self.loaded.drain_ms, 3),
                "status": self.verify.status,
            }
        if self.verify.status == "failed":
            self.failed_check = self.verify
            self._fail(MigrationError(f"verification failed: {self.verify.detail}"))
            return Re.VERIFY_FAILED
        if self.head.verify == "on":
            self.verify.status = "pending"  # until the audit after resume passed
        return Re.VERIFY_PASSED

    # ---- the hand-over
    def _send_ready(self) -> None:
        assert self.conn is not None and self.verify is not None
        t = self.times
        ms = (t["verified"] - t["loaded"]) * 1e3
        check = self.verify.phases.get("pre-resume", {}).get("status", self.verify.status)
        drain_ms = self.loaded.drain_ms if self.loaded is not None else 0.0
        self.conn.reply.send(Ready(ms, self.verify.pages_checked, str(check), drain_ms))

    def _await_go(self) -> ReceiverEvent:
        # The source answers at once; one that does not has stopped. Giving up is safe:
        # the "failed" sent then tells a source that wakes up to keep its VM.
        assert self.conn is not None
        msg = self.conn.reply.receive(self.timeout_s, '"go"')
        if isinstance(msg, Abandon):
            raise abandoned(msg)
        if not isinstance(msg, Go):
            raise MigrationError(f"the source did not hand over: it sent {msg!r}")
        if self.loaded is not None and self.loaded.owed is not None:
            return Re.GO_POSTCOPY
        return Re.GO_UNAUDITED if self.head.verify == "on" else Re.GO

    def _start_vm(self) -> None:
        assert self.machine is not None
        self.times["go"] = time.monotonic()
        self.guest_started = True  # even if the start fails half-way: it may have run
        DestinationDevices(self.machine.devices).start()
        self.machine.start()
        self.running = True
        if self.postcopy is not None:
            self.postcopy.started(self.machine)
        self.times["started"] = time.monotonic()

    def _send_resumed(self) -> None:
        assert self.conn is not None
        try:
            self.conn.reply.send(Resumed((self.times["started"] - self.times["go"]) * 1e3))
        except OSError as e:
            # The source was released by "go": the guest is this one now, whatever
            # became of the connection.
            log.warning("could not confirm the resume to the source: %s", e)

    # ---- the end of a failed one
    def _stop_heartbeat(self) -> None:
        if self.conn is not None:
            self.conn.heartbeat.stop()

    def _send_failed(self) -> None:
        if self.conn is None:
            return  # nobody to tell
        # What the check found goes too: the source reports it as its own result.
        found = None if self.failed_check is None else verify_dict(self.failed_check)
        with contextlib.suppress(OSError):
            self.conn.reply.send(Failed(str(self.error), found, started=self.guest_started))

    def _discard(self) -> None:
        end_postcopy(self)  # nothing may wait on a page of RAM that goes
        if self.keep_vm:
            return  # a failed audit's VM the source may not know about (audit_side._keep)
        if self.machine is not None:
            self.machine.close()
            self.machine = None
            return
        if self.devices is not None:
            self.devices.close()
        if self.memory is not None:
            self.memory.close()
        self.memory = self.devices = None

    def _loading_action(self) -> None:
        raise MigrationError(f"{self.walk.name}: a loading action outside the section loop")

    _ACTIONS: Mapping[ReceiverAction, Callable[[Reception], ReceiverEvent | None]] = (
        MappingProxyType(
            {
                Ra.REPORT_STATUS: _report_status,
                Ra.AWAIT_SOURCE: _await_source,
                Ra.REFUSE_CONNECTION: _refuse_connection,
                Ra.START_HEARTBEAT: _start_heartbeat,
                Ra.READ_SECTION: _read_section,
                Ra.SET_UP: _set_up,
                Ra.SEND_ACCEPTED: _send_accepted,
                **dict.fromkeys(LOADING_ACTIONS - {Ra.READ_SECTION}, _loading_action),
                Ra.VERIFY: _verify,
                Ra.SEND_READY: _send_ready,
                Ra.AWAIT_GO: _await_go,
                Ra.START_VM: _start_vm,
                Ra.SEND_RESUMED: _send_resumed,
                Ra.STOP_HEARTBEAT: _stop_heartbeat,
                # The audit after resume (x-verify on): audit_side.py.
                Ra.HOLD_OUTPUT: hold_output,
                Ra.AWAIT_AUDIT: lambda r: await_audit(r),  # looked up late (tests patch it)
                Ra.SEND_AUDITED: send_audited,
                Ra.RELEASE_OUTPUT: release_output,
                Ra.STOP_VM: stop_vm,
                Ra.DROP_OUTPUT: drop_output,
                Ra.KEEP_UNAUDITED: keep_unaudited,
                Ra.SEND_FAILED: _send_failed,
                Ra.DISCARD: _discard,
                # Post-copy: postcopy/receiving.py.
                Ra.PREPARE_POSTCOPY: prepare_postcopy,
                Ra.GATE_DMA: gate_dma,
                Ra.AWAIT_LANDED: await_landed,
                Ra.END_POSTCOPY: end_postcopy,
                Ra.SEND_LANDED: send_landed,
                Ra.AWAIT_RECOVER: await_recover,
            }
        )
    )


__all__ = ["IncomingResult", "Reception"]
