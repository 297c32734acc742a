"""The destination's view of its source: the main connection (reply path, heartbeat,
capped stream), what a failure means (which receiver event it is), and the checks on a
connection before it counts as a source's."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field

from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.memory.userfaultfd import UserFault, UserFaultError
from vmferry.migration.channel import PeerClosed, ReplyPath
from vmferry.migration.codec import MAGIC, ConfigRecord
from vmferry.migration.liveness import Heartbeat, bound_socket, is_timeout, receive_timeout
from vmferry.migration.loader import SourceAbandoned, read_head
from vmferry.migration.metrics import VerifyResult
from vmferry.migration.params import MigrationParameters
from vmferry.migration.receiver_machine import ReceiverEvent
from vmferry.migration.stream import CHANNEL_GRAMMAR, StreamReader
from vmferry.migration.streamcap import StreamBudget
from vmferry.migration.tlssocket import stream_source
from vmferry.migration.transport import StreamEndsEarly

Re = ReceiverEvent

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
    # Post-copy's figures here (postcopy.destination_side.PostcopyDestination.figures).
    postcopy: dict[str, float] = field(default_factory=dict)


def peer_timeout(ms: int | None) -> float:
    """The source's x-peer-timeout (seconds), from its CONF (checked there); the default
    if it has none."""
    return DEFAULT_PEER_TIMEOUT_S if ms is None else ms / 1e3


def bound(sock: socket.socket, timeout_s: float) -> None:
    # SO_RCVTIMEO makes the blocking readv(2) give up, so a silent source is noticed.
    bound_socket(sock, timeout_s)
    receive_timeout(sock, timeout_s)


def wake(sock: socket.socket) -> None:
    # Readers blocked on the socket see its end (close(2) alone does not wake them).
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


def went_away(e: BaseException) -> bool:
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


def address(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return "a local socket"
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "an unknown address"
    return f"{host}:{port}"


def not_a_stream(sock: socket.socket) -> str:
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


def postcopy_unavailable() -> str:
    """Why this destination cannot take a switch to post-copy ("" if it can): a VM's RAM
    needs a full userfaultfd (KVM's faults are the kernel's, on the vCPU's behalf)."""
    try:
        UserFault().close()
    except UserFaultError as e:
        return str(e)
    return ""


def verify_dict(v: VerifyResult) -> dict[str, object]:
    return {
        "status": v.status,
        "pages_checked": v.pages_checked,
        "mismatched_pages": v.mismatched_pages,
        "cpu_state": v.cpu_state,
        "detail": v.detail,
    }


def failure_event(e: BaseException) -> ReceiverEvent:
    """The event a failure is (the order matters: a closed source's EOF may surface as a
    StreamError, and an abandon is a MigrationError)."""
    if isinstance(e, SourceAbandoned):
        return e.event
    if went_away(e):
        return Re.SOURCE_CLOSED
    if not isinstance(e, StreamError | MigrationError) and is_timeout(e):
        return Re.SOURCE_SILENT
    return Re.ERROR


def reported(
    e: BaseException, event: ReceiverEvent, during: str, timeout_s: float
) -> BaseException:
    """The failure ``e`` in the words the destination reports it with (``e`` itself if
    they are its own): ``during`` is what was being read, for a source that closed."""
    if event is Re.SOURCE_CLOSED:
        # No ABRT, no "abandon": the source ended without a word.
        return MigrationError(
            f"the source closed the connection during {during} (it stopped or was killed): {e}"
        )
    if event is Re.SOURCE_SILENT:
        return MigrationError(
            f"the source sent nothing for {timeout_s:.1f} s: it stopped, or the link to it is down"
        )
    if isinstance(e, StreamError | MigrationError):
        return e
    if isinstance(e, VmferryError):
        return MigrationError(str(e))
    if isinstance(e, OSError):
        return MigrationError(f"connection to the source failed: {e}")
    return e


class Connection:
    """The source's main connection once accepted: the socket, its reply path, the
    heartbeat on it and the stream read from it, with the per-round cap."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.budget = StreamBudget()  # until CONF: no more than a CONF
        bound(sock, timeout_s)
        self.reply = ReplyPath(sock, peer="the source")
        # The source watches this: a destination that stops (or hangs) is noticed.
        self.heartbeat = Heartbeat(self.reply, timeout_s)
        self._stream: StreamReader | None = None

    def read_head(self) -> ConfigRecord:
        """The stream's header (its version checked) and its first section, the CONF: what
        fails here fails with the reply path open, so the source is told why."""
        self._stream = StreamReader(
            self.budget.source(stream_source(self.sock, "migration stream"))
        )
        return read_head(self._stream)

    @property
    def stream(self) -> StreamReader:
        assert self._stream is not None, "the stream is opened by read_head"
        return self._stream

    def rebound(self, timeout_s: float) -> None:
        """The source's own x-peer-timeout, from its CONF."""
        bound(self.sock, timeout_s)
        self.heartbeat.set_timeout(timeout_s)

    def channel(self, sock: socket.socket, index: int, timeout_s: float) -> StreamReader:
        bound(sock, timeout_s)
        source = self.budget.source(stream_source(sock, f"channel {index}"))
        return StreamReader(source, CHANNEL_GRAMMAR)


__all__ = [
    "CHANNEL_ACCEPT_TIMEOUT_S",
    "DEFAULT_PEER_TIMEOUT_S",
    "Connection",
    "IncomingResult",
    "address",
    "bound",
    "failure_event",
    "not_a_stream",
    "peer_timeout",
    "postcopy_unavailable",
    "reported",
    "verify_dict",
    "wake",
    "went_away",
]
