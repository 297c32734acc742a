"""Bounds on every wait for the peer: socket timeouts, and the destination's heartbeat.

A peer can go silent without a word (SIGSTOP, a link that drops every packet, a host that
hangs), and TCP alone would wait many minutes before saying so. So every migration socket
gets a send timeout, ``TCP_USER_TIMEOUT`` and keepalive probes within the bound
(``x-peer-timeout``); the destination says ``alive`` on the reply path while it works
(``Heartbeat``), and the source reads the reply path on its own thread and declares the
destination dead after that long without a word (``PeerWatch``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from vmferry.errors import MigrationCancelled, MigrationError
from vmferry.migration.channel import PeerClosed, PeerSilent, ReplyPath
from vmferry.migration.codec import Alive, Failed, ReplyMessage

log = logging.getLogger(__name__)

# A heartbeat every fifth of the bound: a few may be late (a busy host) before one is missed.
HEARTBEAT_FRACTION = 5
MAX_HEARTBEAT_S = 1.0
WATCH_POLL_S = 0.2  # how often the watch looks at its stop flag while the peer is quiet


def heartbeat_interval(timeout_s: float) -> float:
    return min(MAX_HEARTBEAT_S, timeout_s / HEARTBEAT_FRACTION)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def bound_socket(sock: socket.socket, timeout_s: float) -> None:
    """A send that makes no progress for ``timeout_s`` fails (EAGAIN), as does data left
    unacknowledged that long (ETIMEDOUT); keepalive probes find a dead peer of an idle
    connection within the same bound."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout_s))
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a local socket (socket_link): its peer cannot vanish without an EOF
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(timeout_s * 1e3)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Keepalive counts whole seconds: idle a third of the bound, then probes each second.
    probe_s = max(1, math.floor(timeout_s / 3))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, math.ceil(timeout_s) - probe_s))


def receive_timeout(sock: socket.socket, timeout_s: float) -> None:
    """A blocking read that gets nothing for ``timeout_s`` fails (EAGAIN)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout_s))


def is_timeout(e: BaseException) -> bool:
    """A send or receive timed out (SO_SNDTIMEO/SO_RCVTIMEO: EAGAIN; TCP_USER_TIMEOUT:
    ETIMEDOUT)."""
    return isinstance(e, BlockingIOError | TimeoutError)


class Heartbeat:
    """The destination's ``alive`` on the reply path, from its own thread, until stopped."""

    def __init__(self, reply: ReplyPath, timeout_s: float) -> None:
        self.reply = reply
        self.interval = heartbeat_interval(timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set_timeout(self, timeout_s: float) -> None:
        self.interval = heartbeat_interval(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reply.send(Alive())
            except OSError as e:
                # The main thread finds out through its own reads, with a better message.
                log.debug("heartbeat stopped: %s", e)
                return


class PeerWatch:
    """The source's reader of the reply path: heartbeats mark the destination alive, other
    messages queue for ``next``. After ``timeout_s`` without a word, or when the reply path
    ends, ``on_lost`` runs once (on the watch's thread), so that a source blocked in a send
    is woken at once rather than when its own send timeout passes."""

    def __init__(
        self, reply: ReplyPath, timeout_s: float, on_lost: Callable[[], None] | None = None
    ) -> None:
        self.reply = reply
        self.timeout_s = timeout_s
        self.on_lost = on_lost or (lambda: None)
        self.last_heard = time.monotonic()
        self.silent = False  # declared dead: nothing for timeout_s
        self.closed = ""  # why the reply path ended ("" while it is open)
        self._hung_up = False  # it ended because the destination closed it (not garbage)
        self.eof = False  # it ended at an EOF (the peer closed it), not a reset
        self.failure = ""  # the error the destination sent in a "failed" message
        self._cancelled = False  # the user cancelled: a wait in next() ends at once
        self._messages: deque[ReplyMessage] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(WATCH_POLL_S * 5)

    def cancel(self) -> None:
        """End a wait in ``next`` (MigrationCancelled), the connection left as it is so that
        the source can still tell the destination why."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    @property
    def lost(self) -> bool:
        return self.silent or bool(self.closed)

    def _run(self) -> None:
        while not self._stop.is_set():
            left = self.last_heard + self.timeout_s - time.monotonic()
            try:
                # Past the deadline, one last look (poll 0): what is already here counts,
                # e.g. after this process itself was stopped for a while.
                msg = self.reply.receive(
                    min(WATCH_POLL_S, max(left, 0.0)), "a word from the destination"
                )
            except PeerSilent:
                if left <= 0:
                    self._end(silent=True)
                    return
                continue
            except Exception as e:  # whatever its reply raised, the peer failed
                if not self._stop.is_set():
                    bad = f"the peer sent a malformed reply: {e!r}"
                    why = str(e) if isinstance(e, MigrationError) else bad
                    self.eof = isinstance(e, PeerClosed) and e.__cause__ is None
                    self._end(closed=why, hung_up=isinstance(e, PeerClosed))
                return
            with self._cond:
                self.last_heard = time.monotonic()
                if not isinstance(msg, Alive):
                    if isinstance(msg, Failed):
                        self.failure = msg.error
                    self._messages.append(msg)
                self._cond.notify_all()

    def _end(self, *, silent: bool = False, closed: str = "", hung_up: bool = False) -> None:
        with self._cond:
            self.silent, self.closed, self._hung_up = silent, closed, hung_up
            self._cond.notify_all()
        self.on_lost()

    def next(self, cap_s: float, waiting_for: str) -> ReplyMessage:
        """The next message that is not a heartbeat. Raises PeerSilent when the destination
        has been silent too long (or ``cap_s`` passed), PeerClosed when it hung up."""
        deadline = time.monotonic() + cap_s
        with self._cond:
            while not self._messages:
                if self._cancelled:
                    raise MigrationCancelled(
                        f"cancelled by the user while waiting for {waiting_for}"
                    )
                if self.silent:
                    raise PeerSilent(
                        f"the destination sent nothing for {self.timeout_s:.1f} s while "
                        f"waiting for {waiting_for}"
                    )
                if self.closed and self._hung_up:
                    raise PeerClosed(f"the destination closed the connection before {waiting_for}")
                if self.closed:
                    raise MigrationError(self.closed)  # e.g. a malformed reply
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerSilent(f"no {waiting_for} from the destination within {cap_s:.0f} s")
                self._cond.wait(min(left, WATCH_POLL_S))
            return self._messages.popleft()

    def wait_ended(self, timeout_s: float) -> None:
        """Wait (a little) for the reply path to end, to read a ``failed`` sent before it."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self.lost and not self.failure:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)


def shutdown_all(socks: list[socket.socket]) -> None:
    """Unblock every send and receive in progress on these sockets."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
