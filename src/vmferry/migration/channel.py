"""Where a migration goes: URIs, TCP channels, and the destination's reply path.

The main connection carries the stream one way and short JSON lines back (the reply
path, codec's ``ReplyMessage``): ``ready`` (loaded and verified, not running), then the
source's ``go``, then ``resumed``; or ``failed`` with the reason.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmferry.errors import ConfigError, MigrationError
from vmferry.memory.dirty import DirtyBitmap
from vmferry.migration.codec import ReplyMessage, decode_reply, encode_reply

# Pages travel on channel (page // 512) % n: a 2 MiB block always takes the same channel, so
# a page re-sent in a later round can never overtake its older copy on another channel.
CHANNEL_BLOCK_SHIFT = 9
CHANNEL_BLOCK_WORDS = (1 << CHANNEL_BLOCK_SHIFT) // 64
MAX_REPLY = 1 << 16


@dataclass(frozen=True)
class MigrationUri:
    scheme: str  # tcp | file
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6, as it was given
        return f"tcp:{host}:{self.port}"


def parse_uri(uri: str) -> MigrationUri:
    scheme, _, rest = uri.partition(":")
    if scheme == "file" and rest:
        return MigrationUri("file", path=rest)
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 <= int(port) < 65536:  # 0: any free port
            return MigrationUri("tcp", host=host, port=int(port))
    raise ConfigError(f"migration URI {uri!r}: expected tcp:HOST:PORT or file:PATH")


def split_by_channel(dirty: DirtyBitmap, n: int) -> list[DirtyBitmap]:
    """The pages of each channel, as bitmaps (whole words: a block is 8 words)."""
    return dirty.split_blocks(CHANNEL_BLOCK_WORDS, n)


def connect(uri: MigrationUri, timeout: float = 10.0) -> socket.socket:
    try:
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
    except OSError as e:
        raise MigrationError(f"cannot connect to the destination {uri}: {e.strerror or e}") from e
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Large socket buffers: a migration is one long bulk transfer.
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    return sock


def listen(uri: MigrationUri) -> socket.socket:
    family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((uri.host, uri.port))
    except OSError as e:
        sock.close()
        raise MigrationError(f"cannot listen on {uri}: {e.strerror or e}") from e
    sock.listen(16)
    return sock


def accept(listener: socket.socket, timeout: float | None, what: str) -> socket.socket:
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        raise MigrationError(f"no {what} connected within {timeout:.0f} s") from None
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return conn


class PeerSilent(MigrationError):
    """The peer sent nothing within the time allowed."""


class PeerClosed(MigrationError):
    """The peer closed (or reset) the connection."""


class ReplyPath:
    """JSON lines on the main connection, against the direction of the stream.

    Sends may come from several threads (a heartbeat beside the main thread): each line
    goes out whole. Receiving polls the fd instead of setting a socket timeout, which would
    make the fd non-blocking under a writer on another thread.
    """

    def __init__(self, sock: socket.socket, peer: str = "the peer") -> None:
        self.sock = sock
        self.peer = peer  # who is at the other end, for messages ("the source")
        self._buf = bytearray()
        self._send_lock = threading.Lock()

    def send(self, msg: ReplyMessage) -> None:
        line = encode_reply(msg)
        with self._send_lock:
            self.sock.sendall(line)

    def send_with(self, msg: ReplyMessage, body: bytes) -> None:
        """A line that announces binary data, and the data (the audit's chunks)."""
        line = encode_reply(msg)
        with self._send_lock:
            self.sock.sendall(line)
            self.sock.sendall(body)

    def receive_body(self, n: int, timeout: float, waiting_for: str) -> bytes:
        """The ``n`` bytes that follow a line announcing them."""
        self._fill_until(lambda: len(self._buf) >= n, timeout, waiting_for, body=n)
        body = bytes(self._buf[:n])
        del self._buf[:n]
        return body

    def _fill_until(
        self, done: Callable[[], bool], timeout: float, waiting_for: str, body: int = 0
    ) -> None:
        """Read into the buffer until ``done()``: PeerSilent past ``timeout``, PeerClosed
        when the connection ends. ``body``: the size of the body being read (0: a line,
        at most MAX_REPLY bytes). Even at the deadline what has already arrived is read
        (a zero-time poll)."""
        deadline = time.monotonic() + timeout
        while not done():
            if not self._readable(max(deadline - time.monotonic(), 0.0)):
                raise PeerSilent(f"no {waiting_for} from {self.peer} within {timeout:.0f} s")
            try:  # readable: returns without blocking
                chunk = self.sock.recv(min(body - len(self._buf), 1 << 20) if body else 4096)
            except BlockingIOError:  # SO_RCVTIMEO on a spurious wake-up
                continue
            except OSError as e:
                doing = "reading" if body else "waiting for"
                raise PeerClosed(f"connection lost {doing} {waiting_for}: {e}") from e
            if not chunk:
                where = "in" if body else "before"
                raise PeerClosed(f"{self.peer} closed the connection {where} {waiting_for}")
            self._buf += chunk
            if not body and len(self._buf) > MAX_REPLY:
                raise MigrationError("the peer sent an oversized reply")

    def _readable(self, timeout: float) -> bool:
        pending = getattr(self.sock, "pending", None)  # bytes a TLS layer already decrypted
        if pending is not None and pending():
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(max(0, int(timeout * 1e3))))

    def receive(self, timeout: float, waiting_for: str) -> ReplyMessage:
        self._fill_until(lambda: b"\n" in self._buf, timeout, waiting_for)
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return decode_reply(line)
