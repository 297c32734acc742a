"""The source side of a live migration: pre-copy rounds, switchover, hand-over, rollback.

Until the destination says ``ready`` (everything loaded and verified) and the source has
answered ``go``, the source keeps everything it needs: any failure or a cancel resumes the
VM here as if nothing happened. After ``go`` the source never runs the guest again.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vmferry.errors import ConfigError, MigrationCancelled, MigrationError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration import policy, tls
from vmferry.migration.channel import (
    PeerClosed,
    ReplyPath,
    connect,
    parse_uri,
    split_by_channel,
)
from vmferry.migration.codec import (
    ABRT,
    CEND,
    CHAN,
    CONF,
    DEVS,
    END,
    ROUND,
    VRFY,
    Abandon,
    AbandonNotice,
    Accepted,
    ChannelRecord,
    ConfigRecord,
    DeviceSummary,
    Failed,
    Go,
    Ready,
    ReplyMessage,
    Resumed,
    RoundMarker,
    VerifyRecord,
)
from vmferry.migration.devices import SourceDevices, blockers
from vmferry.migration.liveness import PeerWatch, bound_socket, is_timeout, shutdown_all
from vmferry.migration.metrics import BandwidthWindow, MigrationStats, RoundRecord
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.ram import DEFAULT_BATCH_PAGES, Batch, RamSender, RamStats
from vmferry.migration.snapshot import write_cpu_state
from vmferry.migration.status import MigrationStatus, may_become
from vmferry.migration.stream import StreamWriter
from vmferry.migration.tlssocket import stream_sink
from vmferry.migration.transport import FdSink
from vmferry.migration.verify import cpu_digest, page_digests

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 120.0  # destination loads the last data and verifies
RESUMED_TIMEOUT_S = 30.0
CANCEL_GRACE_S = 1.0  # how long a cancel lets the senders reach a section boundary

EventSink = Callable[[str, dict[str, Any]], None]


def check_file_target(path: str) -> None:
    """A file: URI must name a file that can be created or replaced: refuse one in a
    missing or unwritable directory (or a directory itself) before anything starts."""
    target = Path(path)
    where = f"file:{path}"
    if target.is_dir():
        raise ConfigError(f"{where}: is a directory (give a file name)")
    parent = target.parent
    if not parent.exists():
        raise ConfigError(f"{where}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ConfigError(f"{where}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: directory {parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{where}: the file exists and is not writable")


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
    ) -> None:
        self.machine = machine
        self.uri = parse_uri(uri)
        if self.uri.scheme == "file":
            check_file_target(self.uri.path)  # now, not in the thread after the VM was set up
        self.tls = tls.client_for(params.tls_creds, params.tls_hostname, self.uri)
        self.params = params
        self.caps = caps
        self.on_event = on_event or (lambda name, data: None)
        self.stats = MigrationStats(status="setup", total_ram=machine.memory.size)
        # The migration's threads write the stats, QMP reads them: compound updates and
        # the reader's copy (snapshot) hold this lock.
        self._lock = threading.Lock()
        self._window = BandwidthWindow()
        self._device_pending = 0  # device bytes left at the last sync, for expected downtime
        self._t_pause: float | None = None  # when the VM was paused for the switchover
        self.devices = SourceDevices(machine.devices)
        self._reply: ReplyPath | None = None
        self._main_writer: StreamWriter | None = None  # a live migration's main stream
        self._stream_ended = False  # END is out: what follows on the main stream is lines
        self._watch: PeerWatch | None = None
        self._phase = "the set-up"  # what the source was doing, for error messages
        self.released = False  # after "go": this VM must never run here again
        self.done = threading.Event()
        self._cancel = threading.Event()
        self._cancel_reason = "cancelled by the user"
        self._socks: list[socket.socket] = []
        self._cancel_timer = threading.Timer(CANCEL_GRACE_S, shutdown_all, args=(self._socks,))
        self._cancel_timer.daemon = True
        self._paused_by_us = False
        self._seed = secrets.randbits(63)
        self._t0 = 0.0
        self._thread = threading.Thread(target=self._main, name="migration", daemon=True)
        self._digest_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest")

    # ---- control
    def start(self) -> None:
        self._t0 = time.monotonic()
        self._set_status(MigrationStatus.SETUP)
        self._thread.start()

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Abandon the migration unless the hand-over already happened; ``reason`` is what
        query-migrate and the destination are told."""
        if self.released or self.done.is_set():
            return
        first = not self._cancel.is_set()
        if first:
            self._cancel_reason = reason
        self._cancel.set()
        if first:
            # QEMU's: "cancelling" until the rollback is done, then "cancelled".
            self._set_status(MigrationStatus.CANCELLING)
            # The senders stop at the next batch, and the destination is told why (ABRT);
            # a send blocked on a peer that reads nothing is woken a little later.
            self._cancel_timer.start()
            if self._watch is not None:
                self._watch.cancel()  # a wait for the destination's answer ends now

    @property
    def resumable(self) -> bool:
        """A completed migration to a file may be followed by ``cont`` (QEMU's
        postmigrate → running): the file is a copy, the VM's RAM and devices are still
        here. After a hand-over over tcp: the destination runs the VM: never."""
        return self.released and self.uri.scheme == "file" and self.stats.status == "completed"

    def resume_here(self) -> None:
        """Run the VM here again after a migration to a file (see ``resumable``)."""
        if not self.resumable:
            raise MigrationError("only a VM saved to a file: may run again after its migration")
        # Devices were stopped at the switchover: back to RUNNING (a reset if one cannot).
        self.devices.rollback()
        self.released = False
        self.machine.resume()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    @property
    def channels(self) -> int:
        if self.uri.scheme == "file":
            return 1
        return self.params.multifd_channels if self.caps.multifd else 1

    def snapshot(self) -> MigrationStats:
        """The figures as they are now, safe to read while the migration runs; total-time
        counts up while it runs, as QEMU's does."""
        with self._lock:
            snap = self.stats.snapshot()
        if not self.done.is_set() and self._t0:
            snap.total_ms = self._elapsed_ms()
        return snap

    def _set_status(self, status: MigrationStatus) -> None:
        with self._lock:
            # A cancel that came as "go" was sent loses: cancelling may still end otherwise.
            if not may_become(self.stats.status, status):
                return  # the thread moved on (e.g. to "device") before it saw the cancel
            self.stats.status = status
        self.on_event("MIGRATION", {"status": status})

    def _elapsed_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1e3

    # ---- the thread
    def _main(self) -> None:
        try:
            self._migrate()
        except BaseException as e:
            cancelled = self._cancel.is_set()
            msg = self._describe(e)
            with self._lock:  # QMP may be copying the stats (snapshot) right now
                self.stats.error = msg
            if not self.released:
                self._tell_abandoned(e, msg, cancelled)
                self._rollback()
                self._set_status(MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED)
            else:
                self._set_status(MigrationStatus.FAILED)
            log.warning("migration to %s %s: %s", self.uri, self.stats.status, msg)
        finally:
            self._cancel_timer.cancel()
            if self._watch is not None:
                self._watch.stop()
            for s in self._socks:
                s.close()
            self._digest_pool.shutdown(wait=False)
            with self._lock:
                self.stats.total_ms = self._elapsed_ms()
            self.done.set()

    def _describe(self, e: BaseException) -> str:
        """What went wrong, in words: errno texts say how a socket failed, not why."""
        if self._cancel.is_set():
            return self._cancel_reason
        if self.released and isinstance(e, VmferryError):
            return str(e)  # it says why the VM stays paused here
        watch = self._watch
        peer = bool(self._socks) and isinstance(e, OSError | PeerClosed)
        if watch is not None and (watch.silent or is_timeout(e)):
            return (
                f"the destination stopped answering for {self.params.peer_timeout_s:.1f} s "
                f"during {self._phase}"
            )
        if peer and watch is not None:
            # A destination that fails says why on the reply path before it hangs up,
            # which the sender may see first as a reset or a broken pipe.
            watch.wait_ended(1.0)
            if watch.failure:
                return f"the destination refused the VM: {watch.failure}"
        if peer:
            return f"the destination closed the connection during {self._phase}"
        if isinstance(e, VmferryError | OSError):
            return str(e)
        return f"internal error: {e!r}"

    def _tell_abandoned(self, e: BaseException, reason: str, cancelled: bool) -> None:
        """Tell a live destination why the source gives up, so that it can say so instead
        of "the stream ends early": an ABRT section while sections flow, an ``abandon``
        line once END is out. Only when the stream is whole: a failed send or a silent
        peer may have left a section half written, or no one to read it."""
        main, reply = self._main_writer, self._reply
        if main is None or isinstance(e, OSError | PeerClosed) or is_timeout(e):
            return
        if self._watch is not None and (self._watch.silent or self._watch.failure):
            return  # the destination is gone, or failed first and said why
        try:
            if self._stream_ended and reply is not None:
                reply.send(Abandon(reason, cancelled))
            elif not self._stream_ended:
                main.section(ABRT, [AbandonNotice(reason, cancelled).encode()])
        except OSError as err:
            log.info("could not tell the destination why the migration ended: %s", err)

    def _peer_lost(self) -> None:
        # The watch declared the destination dead: wake the sends blocked on it.
        if not self.released:
            shutdown_all(self._socks)

    def _rollback(self) -> None:
        """Leave the source exactly as it was: no throttle, no dirty log, running."""
        m = self.machine
        m.set_throttle(0)
        self.devices.rollback()
        try:
            m.set_dirty_logging(False)
        except VmferryError as e:
            log.warning("could not turn the dirty log off after a failed migration: %s", e)
        if self._paused_by_us and m.exit is None:
            m.resume()
            self.on_event("RESUME", {})
        self._paused_by_us = False
        if self._t_pause is not None:
            # The VM was stopped for the switchover until now: that is this attempt's
            # downtime, even though the migration failed.
            with self._lock:
                self.stats.downtime_ms = (time.monotonic() - self._t_pause) * 1e3
                self.stats.downtime.total_ms = self.stats.downtime_ms

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled by the user")
        if self.machine.exit is not None:
            raise MigrationError("the guest ended during the migration")

    # ---- the flow
    def _open(self) -> list[StreamWriter]:
        if self.uri.scheme == "file":
            fd = os.open(self.uri.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            return [StreamWriter(FdSink(fd))]
        writers = []
        for i in range(self.channels):
            s = connect(self.uri, timeout=self.params.peer_timeout_s)
            if self.tls is not None:  # every channel is TLS; extras handshake on a thread
                s = self.tls.secure(s, i) if i == 0 else self.tls.secure_later(s, i)
            self._socks.append(s)
            bound_socket(s, self.params.peer_timeout_s)
            sink = stream_sink(s) if self.tls else FdSink(s.fileno(), owned=False)
            writers.append(StreamWriter(sink))
        return writers

    def _migrate(self) -> None:
        m, mem, st = self.machine, self.machine.memory, self.stats
        blocked = blockers(m.devices)
        if blocked:
            raise MigrationError("migration blocked: " + "; ".join(blocked))
        writers = self._open()
        main = writers[0]
        if self._socks:
            self._main_writer = main
        mig_id = uuid.uuid4().hex
        setup = ConfigRecord(
            m.config,
            mig_id,
            channels=len(writers),
            resident=tuple(mem.data_ranges()),
            verify=self.caps.x_verify,
            devices=tuple(d.identity for d in m.devices),
            # The destination gives up on a silent source after as long as the source waits.
            peer_timeout_ms=self.params.peer_timeout_ms,
        )
        main.section(CONF, [setup.encode()])
        for i, w in enumerate(writers[1:], start=1):
            w.section(CHAN, [ChannelRecord(mig_id, i).encode()])
        if self._socks:
            # The destination checks the VM and its devices before anything moves: an
            # incompatible destination fails the migration while the VM runs on.
            self._reply = ReplyPath(self._socks[0])
            self._watch = PeerWatch(self._reply, self.params.peer_timeout_s, self._peer_lost)
            self._watch.start()
            if self._cancel.is_set():  # cancelled before there was a watch to wake
                self._watch.cancel()
            msg = self._watch.next(SETUP_TIMEOUT_S, "the destination's set-up answer")
            if not isinstance(msg, Accepted):
                raise MigrationError(f"the destination refused: {_refusal(msg)}")
        compress = self.params.multifd_compression == "zstd"
        # Every byte of a file is checksummed (it may carry no digests to catch damage):
        # the running guest's pages are copied first, so what is hashed is what is written.
        sealed = self.uri.scheme == "file"
        # Under max-bandwidth a batch is one window's budget, so pacing (and the figures
        # query-migrate shows) move in 100 ms steps, not in whole batches.
        batch = policy.batch_pages(self.params.max_bandwidth, DEFAULT_BATCH_PAGES)
        senders = [
            RamSender(w, mem, compress=compress, sealed=sealed, batch_pages=batch) for w in writers
        ]
        m.set_dirty_logging(True)  # from here on every guest write is logged
        self.devices.start()  # DMA dirty tracking on, PRE_COPY for devices that have it
        st.setup_ms = self._elapsed_ms()
        self._set_status(MigrationStatus.ACTIVE)
        limiter = (
            policy.RateLimiter(self.params.max_bandwidth) if self.params.max_bandwidth else None
        )

        pages = DirtyBitmap.from_pages(mem.npages, mem.resident_pages())  # round 0: all data
        bandwidths: list[float] = []
        throttle = policy.ThrottleState()
        round_no = 0
        with ThreadPoolExecutor(max_workers=len(senders)) as pool:
            while True:
                self._check_cancel()
                self._phase = f"round {round_no}"
                t_round = time.monotonic()
                sent = self._send(pool, senders, pages, clear=True, limiter=limiter)
                dev_sent = self.devices.send_precopy(main)
                sent.bytes += dev_sent
                main.section(ROUND, [RoundMarker(round_no, pages.count()).encode()])
                dirty = DirtyBitmap(mem.npages)
                t_sync = time.monotonic()
                m.fetch_dirty_log(dirty)
                self.devices.collect_dirty(dirty)
                sync_ms = (time.monotonic() - t_sync) * 1e3
                with self._lock:
                    st.dirty_sync_count += 1
                dt = max(time.monotonic() - t_round, 1e-6)
                ndirty = dirty.count()
                pending = ndirty * PAGE_SIZE
                bandwidth = sent.bytes / dt
                dirty_rate = pending / dt
                bandwidths.append(bandwidth)
                self._account_round(
                    round_no,
                    t_round,
                    dt,
                    sent,
                    ndirty,
                    bandwidth,
                    dirty_rate,
                    device_bytes=dev_sent,
                )
                dev_pending, dev_initial = self.devices.pending()
                # The stop-and-copy sends scattered dirty pages: judge it by the rounds
                # that did, not by round 0's bulk copy.
                sw_bandwidth = policy.switchover_bandwidth(bandwidths)
                decision = policy.decide(
                    self._elapsed_ms(),
                    pending,
                    sw_bandwidth,
                    dirty_rate,
                    self.params,
                    device_pending=dev_pending,
                    throttle_pct=throttle.pct,
                    # The stop-and-copy syncs the dirty log once more, in series with the
                    # rest: as long as this sync took.
                    overhead_ms=sync_ms,
                    # A device's initial data must be across first (REFERENCE §1).
                    device_initial=dev_initial,
                )
                with self._lock:
                    st.remaining = pending
                    st.expected_downtime_ms = decision.expected_downtime_ms
                    st.convergence = decision.reason
                    self._device_pending = dev_pending
                    st.device_transferred = self.devices.transferred
                if decision.action == "switchover":
                    break
                if decision.action == "cancel":
                    raise MigrationError(f"did not converge: {decision.reason}")
                throttle = policy.next_throttle(
                    throttle, pending, sent.bytes, self.params, self.caps.auto_converge
                )
                if throttle.pct != m.throttle_pct:
                    m.set_throttle(throttle.pct)
                    with self._lock:
                        st.throttle_pct = throttle.pct
                pages = dirty
                round_no += 1
            self._check_cancel()
            # The last sync's set was not sent: KVM keeps those bits until they are cleared,
            # but DMA dirty bits were read-and-cleared, so they must be carried over.
            self._switchover(pool, senders, writers, round_no + 1, dirty)

    def _send(
        self,
        pool: ThreadPoolExecutor,
        senders: list[RamSender],
        pages: DirtyBitmap,
        *,
        clear: bool,
        limiter: policy.RateLimiter | None,
    ) -> RamStats:
        parts = split_by_channel(pages, len(senders))
        with self._lock:
            # QEMU's "remaining": what this round still has to send, falling as it goes.
            self.stats.remaining = pages.count() * PAGE_SIZE
            self._window.start(time.monotonic())

        def one(i: int) -> RamStats:
            def hook(batch: Batch) -> None:
                self._check_cancel()
                if clear:  # the channel's own words: no other channel's pages are re-armed
                    self.machine.clear_dirty_log(batch.dirty, batch.first_page, batch.page_span)
                if limiter is not None:
                    # Pace to max-bandwidth; the budget is shared by all channels.
                    time.sleep(limiter.delay_for(batch.npages * PAGE_SIZE, time.monotonic()))

            return senders[i].send(parts[i], hook, live=clear, after_batch=self._progress)

        total = RamStats()
        for s in pool.map(one, range(len(senders))):
            total.add(s)
        return total

    def _progress(self, batch: RamStats) -> None:
        """The figures as each batch goes out, not only at round ends (on any channel's
        thread)."""
        now = time.monotonic()
        with self._lock:
            st = self.stats
            st.transferred += batch.bytes
            st.normal += batch.normal
            st.duplicate += batch.zero
            st.remaining = max(0, st.remaining - (batch.normal + batch.zero) * PAGE_SIZE)
            if self._window.add(batch.bytes, now):
                st.mbps = self._window.rate * 8 / 1e6
                if st.status == "active":  # the switchover keeps the estimate it was made on
                    # Device state goes in the downtime too (as the last decision saw it).
                    st.expected_downtime_ms = policy.expected_downtime_ms(
                        st.remaining + self._device_pending, self._window.rate
                    )

    def _account_round(
        self,
        index: int,
        t_start: float,
        dt: float,
        sent: RamStats,
        ndirty: int,
        bandwidth: float,
        dirty_rate: float,
        stop_copy: bool = False,
        device_bytes: int = 0,
    ) -> None:
        st = self.stats
        devices = [s.to_dict() for s in self.devices.stats]
        record = RoundRecord(
            index=index,
            start_s=t_start - self._t0,
            duration_s=dt,
            pages=sent.normal + sent.zero,
            zero_pages=sent.zero,
            bytes=sent.bytes,
            dirty_pages=ndirty,
            dirty_rate=dirty_rate,
            bandwidth=bandwidth,
            throttle_pct=self.machine.throttle_pct,
            stop_copy=stop_copy,
            device_bytes=device_bytes,
        )
        with self._lock:
            st.devices = devices
            st.rounds.append(record)
            st.dirty_pages_rate = dirty_rate / PAGE_SIZE
            st.mbps = bandwidth * 8 / 1e6
            if not stop_copy:
                st.precopy_bytes += sent.bytes

    def _switchover(
        self,
        pool: ThreadPoolExecutor,
        senders: list[RamSender],
        writers: list[StreamWriter],
        round_no: int,
        unsent: DirtyBitmap,
    ) -> None:
        m, st, dt_ = self.machine, self.stats, self.stats.downtime
        main = writers[0]
        self._phase = "the switchover"
        t_pause = self._t_pause = time.monotonic()
        # A VM the user had paused stays paused if the migration fails.
        self._paused_by_us = not m.paused
        m.pause()
        self.on_event("STOP", {})
        m.set_throttle(0)
        t1 = time.monotonic()
        dt_.pause_ms = (t1 - t_pause) * 1e3
        self._set_status(MigrationStatus.DEVICE)  # QEMU's name for "stopped, sending the rest"

        # Devices quiesce, stop and hand over their state; after this no DMA happens, so
        # the dirty log below is the last word on guest memory.
        dev_bytes = self.devices.stop_and_copy(main)
        t2 = time.monotonic()
        dt_.device_state_ms = (t2 - t1) * 1e3
        st.device_transferred = self.devices.transferred

        digests: Future[npt.NDArray[np.uint64]] | None = None
        resident = m.memory.resident_pages()
        if self.caps.x_verify:
            # Digest all of RAM as it is now, while the last pages are being sent.
            digests = self._digest_pool.submit(page_digests, m.memory, resident, self._seed, 2)
        dirty = unsent
        m.fetch_dirty_log(dirty)
        self.devices.collect_dirty(dirty)
        with self._lock:
            st.dirty_sync_count += 1
        final = self._send(pool, senders, dirty, clear=False, limiter=None)
        # The stop-and-copy is a round too: the destination counts what the source does.
        stop_copy = RoundMarker(round_no, final.normal + final.zero, stop_copy=True)
        main.section(ROUND, [stop_copy.encode()])
        t3 = time.monotonic()
        bandwidth = final.bytes / max(t3 - t2, 1e-6)
        final.bytes += dev_bytes
        with self._lock:
            st.downtime_bytes = final.bytes
        self._account_round(
            round_no,
            t1,
            t3 - t1,
            final,
            0,
            bandwidth,
            0.0,
            stop_copy=True,
            device_bytes=dev_bytes,
        )
        dt_.final_ram_ms = (t3 - t2) * 1e3

        state = m.save_state()
        write_cpu_state(main, state)
        stats = [s.to_dict() for s in self.devices.stats]
        main.section(DEVS, [DeviceSummary.of(self.devices.identities(), stats).encode()])
        t4 = time.monotonic()
        dt_.cpu_state_ms = (t4 - t3) * 1e3
        if digests is not None:
            rec = VerifyRecord(self._seed, resident, digests.result(), cpu_digest(state))
            main.section(VRFY, rec.encode())
        main.section(END, [])
        self._stream_ended = True
        for w in writers[1:]:
            w.section(CEND, [])
        t5 = time.monotonic()
        dt_.verify_ms = (t5 - t4) * 1e3 if digests is not None else 0.0

        if self.uri.scheme == "file":
            # A file has no one to hand over to: the VM stays paused here (QEMU's
            # postmigrate), and the file continues it with `vmferry run --incoming file:`.
            self.released = True
            self.devices.release()  # STOP, not gone: resume_here brings them back
            m.set_dirty_logging(False)
            with self._lock:
                dt_.total_ms = (time.monotonic() - t_pause) * 1e3
                st.downtime_ms = dt_.total_ms
                st.remaining = 0
                if digests is not None:
                    # Checked where the file is restored, before anything runs there.
                    st.verify.status = st.verify.cpu_state = "deferred"
                    st.verify.pages_checked = int(resident.size)
                    st.verify.detail = "the file carries the digests; they are checked on restore"
            self._set_status(MigrationStatus.COMPLETED)
            return

        assert self._reply is not None and self._watch is not None
        reply, watch = self._reply, self._watch
        msg = watch.next(READY_TIMEOUT_S, "ready from the destination")
        if not isinstance(msg, Ready):
            if isinstance(msg, Failed) and msg.verify is not None:
                self._apply_failed_verify(msg.verify)
            raise MigrationError(f"the destination refused the VM: {_refusal(msg)}")
        dt_.verify_ms += msg.verify_ms
        self._apply_verify(msg)
        self._check_cancel()
        self._phase = "the hand-over"
        reply.send(Go())
        self.released = True  # from here on this VM never runs on the source again
        m.set_dirty_logging(False)
        try:
            msg = watch.next(RESUMED_TIMEOUT_S, "confirmation that the VM resumed")
        except MigrationError as e:
            raise MigrationError(
                f"{e}; the VM stays paused here (postmigrate) because the "
                "destination may be running it"
            ) from e
        if isinstance(msg, Failed):
            # The destination says it did not start the guest (it gave up waiting for
            # "go"): the VM is still only here, so it runs on here.
            self.released = False
            raise MigrationError(f"the destination refused the VM: {msg.error}")
        t_resumed = time.monotonic()
        with self._lock:
            dt_.resume_ms = msg.resume_ms if isinstance(msg, Resumed) else 0.0
            dt_.total_ms = (t_resumed - t_pause) * 1e3
            st.downtime_ms = dt_.total_ms
            st.remaining = 0
        self._set_status(MigrationStatus.COMPLETED)
        self.devices.release()

    def _apply_failed_verify(self, v: dict[str, Any]) -> None:
        """What the destination's check found, when it refused the VM for it."""
        with self._lock:
            res = self.stats.verify
            res.status = "failed"
            res.cpu_state = str(v.get("cpu_state", "off"))
            res.pages_checked = int(v.get("pages_checked", 0))
            res.mismatched_pages = [int(p) for p in v.get("mismatched_pages", [])]
            res.detail = str(v.get("detail", ""))

    def _apply_verify(self, msg: Ready) -> None:
        v = self.stats.verify
        if not self.caps.x_verify:
            return
        with self._lock:
            v.status = "passed"
            v.cpu_state = "passed"
            v.pages_checked = msg.pages_checked


def _refusal(msg: ReplyMessage) -> str:
    """Why the destination said no: its error, or what it sent instead of the answer."""
    return msg.error if isinstance(msg, Failed) else f"it sent {msg.KIND!r}"
