"""The destination side: accept a migration, load and verify it, resume only on ``go``.

Every failure is reported to the source on the reply path (so it resumes its VM) and
raised here with what went wrong; no guest is ever started from a stream that was not
read to its end and verified.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.kvm.system import DEFAULT_DEVICE
from vmferry.machine.machine import Machine
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.channel import MigrationUri, PeerClosed, ReplyPath, accept, listen
from vmferry.migration.codec import MAGIC, Abandon, Accepted, Failed, Go, Ready, Resumed
from vmferry.migration.devices import DestinationDevices
from vmferry.migration.liveness import Heartbeat, bound_socket, is_timeout, receive_timeout
from vmferry.migration.loader import (
    abandoned,
    check_loaded,
    load_stream,
    open_devices,
    populate,
    read_head,
)
from vmferry.migration.metrics import VerifyResult
from vmferry.migration.params import MigrationParameters
from vmferry.migration.stream import CHANNEL_GRAMMAR, StreamReader
from vmferry.migration.streamcap import StreamBudget
from vmferry.migration.tls import TlsServer
from vmferry.migration.tlssocket import stream_source
from vmferry.migration.transport import StreamEndsEarly

log = logging.getLogger(__name__)

# Until the source's CONF says its x-peer-timeout, the destination waits as long as a
# source with the default would.
DEFAULT_PEER_TIMEOUT_S = MigrationParameters().peer_timeout_s
CHANNEL_ACCEPT_TIMEOUT_S = 10.0


@dataclass
class IncomingResult:
    machine: Machine
    verify: VerifyResult
    load_s: float
    rounds: int
    ram_pages: int
    timings: dict[str, float] = field(default_factory=dict)


def _bound(sock: socket.socket, timeout_s: float) -> None:
    # SO_RCVTIMEO makes the blocking readv(2) give up, so a silent source is noticed.
    bound_socket(sock, timeout_s)
    receive_timeout(sock, timeout_s)


def _peer_timeout(ms: int | None) -> float:
    """The source's x-peer-timeout (seconds), from its CONF (checked there); the default
    if it has none."""
    return DEFAULT_PEER_TIMEOUT_S if ms is None else ms / 1e3


def _wake(sock: socket.socket) -> None:
    # Readers blocked on the socket see its end (close(2) alone does not wake them).
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


def _went_away(e: BaseException) -> bool:
    """The error (or what caused it) is the source's end of the connection: EOF mid-stream
    or a reset, not garbage or a check that failed here."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, StreamEndsEarly | ConnectionResetError | ConnectionAbortedError):
            return True
        if isinstance(cur, PeerClosed):
            return True
        # Only what an error was raised *from*: its context may be an unrelated EOF (the
        # main stream woken by this side after a channel failed its checks).
        cur = cur.__cause__
    return False


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "an unknown address"
    return f"{host}:{port}"


def _not_a_stream(sock: socket.socket) -> str:
    """What a plain connection's first bytes (peeked, nothing read) say if they are not a
    vmferry stream's; "" if they may be (or nothing came)."""
    sock.settimeout(CHANNEL_ACCEPT_TIMEOUT_S)
    try:
        first = sock.recv(len(MAGIC), socket.MSG_PEEK)
    except OSError:
        return ""  # silent or gone: the stream's own reads say so
    finally:
        sock.settimeout(None)
    if not first or MAGIC.startswith(first):
        return ""
    return f"not a vmferry stream: it starts with {first!r}, want {MAGIC!r}"


def _verify_dict(v: VerifyResult) -> dict[str, object]:
    return {
        "status": v.status,
        "pages_checked": v.pages_checked,
        "mismatched_pages": v.mismatched_pages,
        "cpu_state": v.cpu_state,
        "detail": v.detail,
    }


class IncomingMigration:
    """Waits on tcp:HOST:PORT for one migration and returns the running machine."""

    def __init__(
        self,
        uri: MigrationUri,
        *,
        kvm_device: str = DEFAULT_DEVICE,
        serial: BinaryIO | None = None,
        announce: bool = True,
        device_versions: dict[str, int] | None = None,
        prealloc: int = 0,
        tls: TlsServer | None = None,
    ) -> None:
        """``prealloc``: allocate this much guest RAM now, before anything arrives (as
        QEMU's -mem-prealloc does): a fresh page costs more to receive into than the
        network does to carry it. Used if the VM that comes has exactly this size."""
        self.uri = uri
        self.kvm_device = kvm_device
        self.serial = serial
        self.announce = announce
        self.device_versions = device_versions or {}
        self.tls = tls  # when set, every connection is TLS with an admitted client
        self.listener = listen(uri)
        self.port = self.listener.getsockname()[1]
        # Called (on the receiving thread) once a source has connected and, with TLS,
        # been admitted: the wait (QEMU's "setup") is over, the migration is "active".
        self.on_connected: Callable[[], None] | None = None
        # One line per stranger's connection refused while waiting (the test reads them).
        self.refusals: list[str] = []
        self._prealloc: GuestMemory | None = None
        if prealloc:
            try:
                self._prealloc = GuestMemory(prealloc)
                self._prealloc.populate()
            except BaseException:
                self.listener.close()
                if self._prealloc is not None:
                    self._prealloc.close()
                raise

    def _memory_for(self, size: int) -> GuestMemory:
        memory, self._prealloc = self._prealloc, None
        if memory is not None and memory.size == size:
            return memory
        if memory is not None:
            log.warning(
                "pre-allocated %d bytes of RAM, but the VM has %d: allocating anew",
                memory.size,
                size,
            )
            memory.close()
        return GuestMemory(size)

    def close(self) -> None:
        """Stop waiting: a ``receive`` blocked in accept returns with an error."""
        _wake(self.listener)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)

    def _refused(self, peer: str, e: BaseException) -> None:
        line = f"refused a connection from {peer}: {str(e).removeprefix('refused a migration: ')}"
        self.refusals.append(line)
        print(f"vmferry: {line}", file=sys.stderr, flush=True)

    def _secure(self, sock: socket.socket, what: str) -> socket.socket:
        return sock if self.tls is None else self.tls.secure(sock, what)

    def receive(self) -> IncomingResult:
        socks: list[socket.socket] = []
        reply: ReplyPath | None = None
        machine: Machine | None = None
        memory: GuestMemory | None = None
        devices: DestinationDevices | None = None
        heartbeat: Heartbeat | None = None
        timeout_s = DEFAULT_PEER_TIMEOUT_S
        started = False  # the guest runs here: from then on nothing may close it
        failed_check: VerifyResult | None = None  # the verification that refused the VM
        budget = StreamBudget()  # until CONF: no more than a CONF
        phase = "the set-up"  # what was being read, for "the source closed the connection"
        try:
            if self.announce:
                print(
                    f"vmferry: waiting for a migration on {self.uri.host}:{self.port}",
                    file=sys.stderr,
                    flush=True,
                )
            # A connection refused before it authenticated (TLS) or before its CONF (a
            # plain destination sent something that is not a vmferry stream) is a
            # stranger's: say so and go on listening for the real source.
            while True:
                conn = accept(self.listener, None, "source")
                peer = _address(conn)
                try:
                    main_sock = self._secure(conn, "source")
                except (MigrationError, OSError) as e:
                    conn.close()
                    self._refused(peer, e)
                    continue
                if self.tls is None and (garbage := _not_a_stream(main_sock)):
                    self._refused(peer, MigrationError(garbage))
                    with contextlib.suppress(OSError):
                        ReplyPath(main_sock).send(Failed(garbage))
                    _wake(main_sock)
                    main_sock.close()
                    continue
                break
            socks.append(main_sock)
            if self.on_connected is not None:
                self.on_connected()
            _bound(main_sock, timeout_s)
            reply = ReplyPath(main_sock, peer="the source")
            # The source watches this: a destination that stops (or hangs) is noticed.
            heartbeat = Heartbeat(reply, timeout_s)
            heartbeat.start()
            t0 = time.monotonic()
            main = StreamReader(budget.source(stream_source(main_sock, "migration stream")))
            head = read_head(main)
            budget.allow(head)
            timeout_s = _peer_timeout(head.peer_timeout_ms)
            _bound(main_sock, timeout_s)
            heartbeat.set_timeout(timeout_s)
            readers = []
            for i in range(1, head.channels):
                s = self._secure(
                    accept(self.listener, CHANNEL_ACCEPT_TIMEOUT_S, f"channel {i}"), f"channel {i}"
                )
                socks.append(s)
                _bound(s, timeout_s)
                readers.append(
                    StreamReader(budget.source(stream_source(s, f"channel {i}")), CHANNEL_GRAMMAR)
                )
            memory = self._memory_for(head.config.memory)
            populate(memory, head.resident)  # no-op on pre-allocated RAM
            devices = open_devices(head, memory, self.device_versions)
            reply.send(Accepted())
            phase = "round"
            loaded = load_stream(
                head,
                main,
                memory,
                readers,
                devices,
                wake_main=lambda: _wake(main_sock),
                on_round=budget.next_round,
            )
            devices.commit()  # RESUMING → STOP: each device checks its state
            t_loaded = time.monotonic()
            machine = Machine.from_state(
                loaded.state,
                memory,
                kvm_device=self.kvm_device,
                serial=self.serial,
                devices=devices.devices,
            )
            memory = None  # the machine owns it now
            devices = None
            verify = check_loaded(loaded, machine)
            t_verified = time.monotonic()
            if verify.status == "failed":
                failed_check = verify
                raise MigrationError(f"verification failed: {verify.detail}")
            reply.send(Ready((t_verified - t_loaded) * 1e3, verify.pages_checked, verify.status))
            # The source answers at once; one that does not has stopped. Giving up is safe:
            # the "failed" sent then tells a source that wakes up to keep its VM.
            phase = "the wait for the hand-over"
            msg = reply.receive(timeout_s, '"go"')
            if isinstance(msg, Abandon):
                raise abandoned(msg)
            if not isinstance(msg, Go):
                raise MigrationError(f"the source did not hand over: it sent {msg!r}")
            t_go = time.monotonic()
            DestinationDevices(machine.devices).start()
            machine.start()
            started = True
            t_started = time.monotonic()
            try:
                reply.send(Resumed((t_started - t_go) * 1e3))
            except OSError as e:
                # The source was released by "go": the guest is this one now, whatever
                # became of the connection.
                log.warning("could not confirm the resume to the source: %s", e)
            heartbeat.stop()
            return IncomingResult(
                machine,
                verify,
                t_loaded - t0,
                loaded.rounds,
                loaded.ram.normal + loaded.ram.zero,
                {"load_s": t_loaded - t0, "verify_s": t_verified - t_loaded},
            )
        except BaseException as e:
            if heartbeat is not None:
                heartbeat.stop()
            if started:
                raise  # nothing after the start raises; never close a running guest
            err: BaseException = e
            if _went_away(e):
                during = f"round {budget.round}" if phase == "round" else phase
                # No ABRT, no "abandon": the source ended without a word.
                err = MigrationError(
                    f"the source closed the connection during {during} (it stopped or was "
                    f"killed): {e}"
                )
            elif isinstance(e, StreamError | MigrationError):
                pass
            elif is_timeout(e):
                err = MigrationError(
                    f"the source sent nothing for {timeout_s:.1f} s: it stopped, or the "
                    "link to it is down"
                )
            elif isinstance(e, VmferryError):
                err = MigrationError(str(e))
            elif isinstance(e, OSError):
                err = MigrationError(f"connection to the source failed: {e}")
            if reply is not None:
                # What the check found goes too: the source reports it as its own result.
                found = None if failed_check is None else _verify_dict(failed_check)
                with contextlib.suppress(OSError):
                    reply.send(Failed(str(err), found))
            if machine is not None:
                machine.close()
            else:
                if devices is not None:
                    devices.close()
                if memory is not None:
                    memory.close()
            if err is e:
                raise
            raise err from e
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            if self._prealloc is not None:
                self._prealloc.close()
                self._prealloc = None
            for s in socks:
                _wake(s)  # a channel thread blocked on its socket returns now
                s.close()
            self.listener.close()
