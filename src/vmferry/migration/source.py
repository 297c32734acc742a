"""The source side of a migration: the driver of its table (source_machine).

The table decides what happens next; this driver carries out its actions — the I/O —
and turns what came of them into the next event: the policy's decision at a round's
end, the destination's answers, or an error classified (failure.py). The migration's
thread loops (source_loop): actions, event, step. ``cancel`` steps CANCEL from the
caller's thread; steps are serialised under the stats lock, and between actions the
thread looks whether a cancel came (then it feeds HALTED).

Until the destination says ``ready`` and the source has answered ``go``, any failure or
a cancel resumes the VM here as if nothing happened. After ``go`` the source never runs
the guest again.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from vmferry.errors import ConfigError, MigrationCancelled, MigrationError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.migration import tls
from vmferry.migration.channel import parse_uri
from vmferry.migration.codec import AbandonNotice, Accepted, Failed, Resumed
from vmferry.migration.connector import Connector, TcpConnector
from vmferry.migration.devices import SourceDevices, blockers
from vmferry.migration.failure import Circumstances, GuestEnded, describe
from vmferry.migration.figures import LiveFigures
from vmferry.migration.guest_ram import RamMigration
from vmferry.migration.handover import (
    RESUMED_TIMEOUT_S,
    SETUP_TIMEOUT_S,
    DestinationRefused,
    Handover,
    StillReleased,
)
from vmferry.migration.link import DestinationLink
from vmferry.migration.metrics import MigrationStats
from vmferry.migration.outgoing import (
    Outgoing,
    assemble,
    check_file_target,
    open_file_target,
    send_config,
)
from vmferry.migration.params import (
    MigrationCapabilities,
    MigrationParameters,
    check_verify_options,
    verify_mode,
)
from vmferry.migration.postcopy import switch as postcopy_switch
from vmferry.migration.postcopy.source_side import PostcopySource
from vmferry.migration.precopy import Precopy
from vmferry.migration.source_loop import Perform, SourceLoop
from vmferry.migration.source_machine import (
    SourceAction,
    SourceEvent,
    SourceMachine,
    SourceState,
    Target,
    round_ended,
)
from vmferry.migration.source_verify import SourceVerification
from vmferry.migration.status import MigrationStatus
from vmferry.migration.stream import StreamWriter
from vmferry.migration.switchover import AfterFinalSync, EventSink, StopCopy
from vmferry.migration.tlssocket import stream_sink
from vmferry.migration.transport import FdSink
from vmferry.migration.vcpus import VcpuMigration

log = logging.getLogger(__name__)

St, Ev, Ac = SourceState, SourceEvent, SourceAction
MAY_RUN_THERE = "; the VM stays paused here (postmigrate) because the destination may be running it"


class MigrationSource:
    """One outgoing migration of a running machine, on its own thread."""

    def __init__(
        self,
        machine: Machine,
        uri: str,
        params: MigrationParameters,
        caps: MigrationCapabilities,
        *,
        on_event: EventSink | None = None,
        connector: Connector | None = None,
        after_final_sync: AfterFinalSync | None = None,
    ) -> None:
        """``after_final_sync``: test-only (vmferry.testing), see switchover.AfterFinalSync."""
        self.machine = machine
        self.uri = parse_uri(uri)
        live = self.uri.scheme == "tcp"
        if not live:
            check_file_target(self.uri.path)  # now, not in the thread after the VM was set up
        self.tls = tls.client_for(params.tls_creds, params.tls_hostname, self.uri)
        self.params = params
        self.caps = caps
        self.on_event = on_event or (lambda name, data: None)
        self.after_final_sync = after_final_sync
        # A file is checked where it is restored, before anything runs: never "on".
        check_verify_options(params, caps)
        mode = verify_mode(params, caps)
        self.verify_mode = "strict" if mode == "on" and not live else mode
        if live and params.postcopy_after and mode == "strict":
            raise ConfigError(postcopy_switch.STRICT_AFTER.format(params.postcopy_after))
        # The migration's threads write the figures, QMP reads them; steps of the walk
        # hold the same lock (a cancel comes from another thread).
        self.figures = LiveFigures(machine.memory.size)
        self.stats = self.figures.stats
        self.verification = SourceVerification(self.verify_mode, self.figures)
        self._lock = self.figures.lock
        self._emit_lock = threading.RLock()  # statuses are announced in the order taken
        self._reported: MigrationStatus | None = None
        self._walk = SourceMachine(Target.LIVE if live else Target.FILE)
        self.devices = SourceDevices(machine.devices)
        self.vcpus = VcpuMigration(machine)
        self.ram = RamMigration(machine)
        self._link = (
            DestinationLink(connector or TcpConnector(self.uri), self.tls, params.peer_timeout_s)
            if live
            else None
        )
        self._out: Outgoing | None = None  # once the streams are open
        self._mig_id = ""  # the CONF's, once sent
        self._postcopy = (
            PostcopySource(
                machine, self.figures, self._link, self.tls, max_bandwidth=params.max_bandwidth
            )
            if self._link
            else None
        )
        self.done = threading.Event()
        self._cancel_reason = "cancelled by the user"
        # migrate-start-postcopy (at the next round's end), or x-postcopy-after.
        self._switch = postcopy_switch.SwitchWish(
            params.postcopy_after,
            allowed=caps.postcopy_ram and live and self.verify_mode != "strict",
        )
        self._seed = secrets.randbits(63)
        self._no_postcopy_there = ""  # why the destination cannot take post-copy (accepted)
        self._thread: threading.Thread | None = None
        self._digest_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest")
        self._perform = self._actions()
        self._loop = SourceLoop(
            self._walk,
            self.figures,
            self._perform,
            circumstances=self._circumstances,
            cancel_reason=lambda: self._cancel_reason,
            rollback=self._rollback,
            on_event=self.on_event,
        )

    # ---- control
    def start(self) -> None:
        self.figures.t0 = time.monotonic()
        with self._lock:
            if self._walk.finished:
                return  # cancelled before it started
            actions = self._walk.step(Ev.START)
            state = self._walk.state
        self._thread = threading.Thread(
            target=self._main, args=(actions, state), name="migration", daemon=True
        )
        self._thread.start()

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Abandon the migration unless the hand-over already happened; ``reason`` is what
        query-migrate and the destination are told. QEMU's: "cancelling" until the
        rollback is done, then "cancelled"."""
        with self._lock:
            before = self._walk.state
            actions = self._walk.step(Ev.CANCEL)
            if self._walk.state is not before:
                self._cancel_reason = reason
            never_started = self._walk.state is St.CANCELLED
            paused = self._walk.state is St.POSTCOPY_PAUSED
        if paused:  # nothing resumes it: it ends, the VM lost there (kept here, paused)
            self._pc().give_up()
        if never_started:
            self.figures.failed(reason)
        for action in actions:
            self._perform[action]()
        if never_started:
            self.figures.ended()
            self.done.set()

    def request_postcopy(self) -> None:
        """QMP migrate-start-postcopy: switch to post-copy at the end of the round in
        flight (as QEMU does, at its next iteration). A MigrationError with one line if
        it cannot start now."""
        with self._lock:
            why = postcopy_switch.refusal(
                self._walk.state,
                postcopy_ram=self.caps.postcopy_ram,
                live=self._link is not None,
                verify_mode=self.verify_mode,
                requested=self._switch.requested,
            )
            if why is None and self._no_postcopy_there:
                why = f"migrate-start-postcopy: {postcopy_switch.CANNOT_THERE}"
                why += self._no_postcopy_there
            if why is not None:
                raise MigrationError(why)
            self._switch.requested = True

    def pause_postcopy(self) -> None:
        """QMP migrate-pause: refused in one line (a broken link pauses by itself)."""
        raise MigrationError(postcopy_switch.NO_PAUSE)

    def resume_postcopy(self, uri: str) -> None:
        """QMP migrate with resume=true: a new link to the destination (which listens on
        ``uri`` after its migrate-recover); made on the migration's thread."""
        with self._lock:
            state, status = self._walk.state, self._walk.status
        if state is not St.POSTCOPY_PAUSED:
            raise MigrationError(f"the migration is not paused in post-copy (it is {status})")
        self._pc().resume(uri)

    @property
    def released(self) -> bool:
        """The VM belongs to the destination (or the file): it must not run here."""
        return self._walk.released

    @property
    def resumable(self) -> bool:
        """A completed migration to a file may be followed by ``cont`` (QEMU's
        postmigrate → running): the file is a copy, the VM's RAM and devices are still
        here. After a hand-over over tcp: the destination runs the VM: never."""
        return self._walk.resumable

    def resume_here(self) -> None:
        """Run the VM here again after a migration to a file (see ``resumable``)."""
        with self._lock:
            if not self._walk.resumable:
                raise MigrationError("only a VM saved to a file: may run again after its migration")
            actions = self._walk.step(Ev.CONT)
        for action in actions:
            self._perform[action]()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    @property
    def channels(self) -> int:
        if self.uri.scheme == "file":
            return 1
        return self.params.multifd_channels if self.caps.multifd else 1

    @property
    def started_at(self) -> float:
        """When it started, on the monotonic clock (rounds' ``start_s`` count from it)."""
        return self.figures.t0

    def snapshot(self) -> MigrationStats:
        """The figures as they are now, safe to read while the migration runs."""
        return self.figures.snapshot(running=not self.done.is_set())

    # ---- the thread: actions, then the event they ended in, then the next step
    def _main(self, actions: tuple[SourceAction, ...], state: SourceState) -> None:
        try:
            self._loop.run(actions, state)
        finally:  # whatever it came to: the link and the streams closed, waiters woken
            if self._postcopy is not None:
                self._postcopy.close()  # before its sockets close under its threads
            if self._link is not None:
                self._link.close()
            if self._out is not None:
                self._out.channels.close()
            self._digest_pool.shutdown(wait=False)
            self.figures.ended()
            if self.stats.status != MigrationStatus.COMPLETED:
                log.warning("migration to %s %s: %s", self.uri, self.stats.status, self.stats.error)
            self.done.set()

    def _circumstances(self) -> Circumstances:
        walk, out = self._walk, self._out
        phase = walk.phase
        if walk.state is St.PRECOPY and out is not None:
            phase = f"round {out.precopy.round_no}"
        return Circumstances(
            phase=phase,
            peer_timeout_s=self.params.peer_timeout_s,
            watch=self._link.watch if self._link else None,
            connected=bool(self._link and self._link.socks),
            cancel_reason=self._cancel_reason if walk.cancelling else None,
            released=walk.released,
        )

    def _actions(self) -> dict[SourceAction, Perform]:
        sc, rounds = self._switchover, self._rounds
        return {
            Ac.REPORT_STATUS: self._report_status,
            Ac.CONNECT: self._connect,
            Ac.SEND_CONFIG: self._send_config,
            Ac.WATCH_PEER: self._watch_peer,
            Ac.AWAIT_ACCEPTED: self._await_accepted,
            Ac.START_DIRTY_TRACKING: self._start_tracking,
            Ac.SEND_ROUND: self._send_round,
            Ac.PAUSE_VM: self._pause,
            Ac.STOP_DEVICES: lambda: sc().stop_devices(),
            Ac.SEND_FINAL_ROUND: lambda: sc().send_final_round(rounds().round_no + 1),
            Ac.SEND_CPU_AND_DEVICES: lambda: sc().send_cpu_and_devices(),
            Ac.SEND_VERIFY: lambda: sc().send_verify(),
            Ac.END_STREAM: self._end_stream,
            Ac.AWAIT_READY: self._await_ready,
            Ac.SEND_GO: self._send_go,
            Ac.STOP_DIRTY_TRACKING: self._stop_tracking,
            Ac.AWAIT_RESUMED: self._await_resumed,
            Ac.SEND_AUDIT: lambda: self.verification.send_audit(
                self._hand(), self.machine, self._seed
            ),
            Ac.AWAIT_AUDITED: lambda: self.verification.audited(self._hand()),
            Ac.RELEASE_DEVICES: self.devices.release,
            Ac.RESUME_HERE: self._run_here,
            Ac.INTERRUPT: self._interrupt,
            Ac.TELL_ABORT: lambda: self._tell(abort=True),
            Ac.TELL_ABANDON: lambda: self._tell(abort=False),
            Ac.ROLLBACK: self._rollback,
            # Post-copy (postcopy/source_side.py).
            Ac.SYNC_OWED: lambda: self._pc().owe(sc().sync_for_postcopy()),
            Ac.SEND_OWED: lambda: self._pc().send_owed(self._outgoing().writers[0]),
            Ac.OPEN_POSTCOPY: lambda: self._pc().open_channels(self._mig_id, self.channels),
            Ac.SERVE_PAGES: lambda: self._pc().serve(),
            Ac.AWAIT_LANDED: lambda: self._pc().await_landed(
                self._hand(), self.verify_mode == "on"
            ),
            Ac.AWAIT_RESUME: self._await_resume,
        }

    def _await_resume(self) -> SourceEvent:
        old, self._link = self._link, self._pc().await_resume()
        if old is not None:
            old.close()
        return Ev.LINK_RESUMED

    def _pc(self) -> PostcopySource:
        assert self._postcopy is not None, "post-copy is a live migration's"
        return self._postcopy

    def _outgoing(self) -> Outgoing:
        assert self._out is not None, "the streams are open after CONNECT"
        return self._out

    def _switchover(self) -> StopCopy:
        return self._outgoing().stop_copy

    def _rounds(self) -> Precopy:
        return self._outgoing().precopy

    def _hand(self) -> Handover:
        assert self._link and self._link.handover, "the reply path is watched after CONF"
        return self._link.handover

    def _checkpoint(self) -> None:
        """Before each batch and round: stop at this boundary if there is a reason."""
        if self._walk.cancelling:
            raise MigrationCancelled(self._cancel_reason)
        if self.machine.exit is not None:
            raise GuestEnded("the guest ended during the migration")

    # ---- the actions
    def _report_status(self) -> None:
        with self._emit_lock:
            with self._lock:
                status = self._walk.status
                if status == self._reported:
                    return
                self._reported = self.stats.status = status
            self.on_event("MIGRATION", {"status": status})

    def _connect(self) -> SourceEvent:
        blocked = blockers(self.machine.devices)
        if blocked:
            raise MigrationError("migration blocked: " + "; ".join(blocked))
        self._out = assemble(
            self.machine,
            self._open(),
            (self.ram, self.vcpus, self.devices),
            self.figures,
            self.params,
            self.caps,
            to_file=self._link is None,
            checkpoint=self._checkpoint,
            verify_seed=self._seed,
            digest_pool=self._digest_pool,
            on_event=self.on_event,
            verify_mode=self.verify_mode,
            after_final_sync=self.after_final_sync,
        )
        return Ev.CONNECTED

    def _open(self) -> list[StreamWriter]:
        if self._link is None:
            return [StreamWriter(FdSink(open_file_target(self.uri.path)))]
        return self._link.open(
            self.channels,
            lambda s: stream_sink(s) if self.tls else FdSink(s.fileno(), owned=False),
            lambda sink: StreamWriter(sink),
        )

    def _send_config(self) -> None:
        self._mig_id = send_config(
            self.machine,
            self._outgoing().writers,
            verify=self.verify_mode,
            peer_timeout_ms=self.params.peer_timeout_ms,
            verify_seed=self._seed,
            hold_output=self.caps.x_verify_hold_output,
        )

    def _watch_peer(self) -> None:
        assert self._link is not None
        self._link.watch_peer(lambda: self._walk.cancelling)

    def _await_accepted(self) -> SourceEvent:
        """The destination's answer to the CONF; it says whether it can take post-copy:
        a switch already asked for (or due by x-postcopy-after) that it cannot take fails
        the migration now, before anything moved; a later one is refused when asked."""
        msg = self._hand().watch.next(SETUP_TIMEOUT_S, "the destination's set-up answer")
        if isinstance(msg, Failed):
            raise DestinationRefused(f"the destination refused: {msg.error}")
        if not isinstance(msg, Accepted):
            raise MigrationError(f"the destination refused: it sent {msg.KIND!r}")
        with self._lock:
            self._no_postcopy_there = msg.postcopy
            wanted = self._switch.allowed and (self._switch.requested or self.params.postcopy_after)
        if wanted and msg.postcopy:
            raise MigrationError(f"{postcopy_switch.CANNOT_THERE}{msg.postcopy}")
        return Ev.ACCEPTED

    def _start_tracking(self) -> None:
        self._rounds().start()
        with self._lock:
            self.stats.setup_ms = self.figures.elapsed_ms()

    def _send_round(self) -> SourceEvent:
        self._checkpoint()
        decision = self._rounds().round()
        with self._lock:
            done, elapsed_s = len(self.stats.rounds), self.figures.elapsed_ms() / 1e3
        event = round_ended(self._switch.decide(decision.action, done, elapsed_s))
        if event is Ev.ROUND_POSTCOPY:
            with self._lock:
                self.stats.convergence = self._switch.reason(done, elapsed_s)
        if event is Ev.ROUND_GIVE_UP:
            why = MigrationError(f"did not converge: {decision.reason}")
            self.figures.failed(describe(why, self._circumstances()))
        return event

    def _pause(self) -> None:
        self._checkpoint()
        self._switchover().pause()
        self.verification.phase("pre-resume")

    def _end_stream(self) -> SourceEvent:
        sc = self._switchover()
        sc.end_stream(self._outgoing().writers)
        if self._walk.target is Target.FILE:
            # A file has no one to hand over to: the VM stays paused here (QEMU's
            # postmigrate), and the file continues it with `vmferry run --incoming file:`.
            sc.saved()
        return Ev.STREAM_ENDED

    def _await_ready(self) -> SourceEvent:
        try:
            msg = self._hand().await_ready()
        except DestinationRefused as e:
            if e.verify is not None:
                self.figures.verify_failed(e.verify)
                self.verification.phase("failed")
            raise
        if self._walk.postcopy:  # before "go": a failure here still rolls back
            self._pc().channels_ready()
        sc = self._switchover()
        sc.verified(msg.verify_ms)
        self.verification.ready(msg, sc.pre_resume_ms)
        return Ev.READY

    def _send_go(self) -> None:
        assert self._link is not None
        self._link.released = True  # a lost destination no longer wakes sends: none left
        self._hand().send_go()

    def _stop_tracking(self) -> None:
        for part in self._outgoing().parts.all:
            part.stop_dirty_tracking()

    def _await_resumed(self) -> SourceEvent:
        """The destination's "resumed". Its "failed" rolls the VM back here only if it
        never started the guest (it gave up waiting for "go"); one that did start it
        (a start that failed half-way, say) may have run it: the VM stays paused here."""
        watch = self._hand().watch
        try:
            msg = watch.next(RESUMED_TIMEOUT_S, "confirmation that the VM resumed")
        except MigrationError as e:
            raise StillReleased(f"{e}{MAY_RUN_THERE}") from e
        if isinstance(msg, Failed):
            if msg.started:
                raise StillReleased(
                    f"the destination failed after it started the VM: {msg.error}{MAY_RUN_THERE}"
                )
            raise DestinationRefused(f"the destination refused the VM: {msg.error}")
        self._switchover().resumed(msg.resume_ms if isinstance(msg, Resumed) else 0.0)
        return self.verification.resumed_event()

    def _run_here(self) -> None:
        # Devices were stopped at the switchover: back to RUNNING (a reset if one cannot).
        self.devices.rollback()
        self.machine.resume()

    def _interrupt(self) -> None:
        # The senders stop at their next batch (_checkpoint); the link wakes the rest.
        if self._link is not None:
            self._link.interrupt()

    def _tell(self, *, abort: bool) -> None:
        if self._link is not None:
            notice = AbandonNotice(self.stats.error, self._walk.state is St.CANCELLED)
            self._link.tell(notice, stream_ended=not abort)

    def _rollback(self) -> None:
        """Leave the source exactly as it was: no throttle, no dirty log, running."""
        m = self.machine
        m.set_throttle(0)
        self.devices.rollback()
        try:
            self.ram.stop_dirty_tracking()
        except VmferryError as e:
            log.warning("could not turn the dirty log off after a failed migration: %s", e)
        if self._out is not None:
            self._out.stop_copy.roll_back()


__all__ = ["EventSink", "MigrationSource", "check_file_target"]
