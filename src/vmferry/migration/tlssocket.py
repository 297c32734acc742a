"""A TLS connection as a socket: OpenSSL over memory BIOs, pumped by the socket's fd.

Python 3.11's ``ssl.SSLSocket`` has no ``sendmsg``, and this kernel has no kernel TLS. An
``SSLSocket`` writes one 16 KiB record per ``write(2)`` and reads a record with two
``read(2)`` calls; an ``ssl.MemoryBIO`` pump encrypts up to ``CHUNK`` bytes of the
caller's buffer at a time and sends the ciphertext with one ``sendall``, and reads
ciphertext in ``RECV_CHUNK`` pieces, decrypting straight into the caller's buffer.
Joining a section's buffers for one ``SSLSocket.sendall`` costs the sender nearly twice
the CPU (a copy of every page into a fresh buffer); ``sendall`` of each buffer costs
about what the pump does. The pump is chosen because one SSL object is then shared safely
by a reader and a writer thread (a lock around each OpenSSL call, none around the socket
I/O), which the reply path's heartbeat needs; ``vmferry bench tls`` measures all three.

It subclasses ``socket.socket`` so the engine's socket handling (timeouts, shutdown to
wake a reader, ``SO_RCVTIMEO``) applies unchanged; only the byte methods are replaced.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from vmferry.errors import MigrationError
from vmferry.migration.transport import (
    Buffer,
    ExactReader,
    FdSink,
    FdSource,
    Sink,
    Source,
    byte_view,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

# 256 KiB steps (16 records) kept the pump ~10% cheaper in CPU than 1 MiB or 4 MiB ones,
# and no dearer than 64 KiB: what OpenSSL writes into the BIO stays in cache.
CHUNK = 256 << 10  # plaintext encrypted per pump step, sent with one sendall
RECV_CHUNK = 256 << 10  # ciphertext read per recv_into
SMALL = 16 << 10  # buffers below this are gathered into one record, not one record each
HANDSHAKE_READ = 16 << 10
HANDSHAKE_LIMIT = 64 << 10  # a handshake (certificates and all) is a few KiB


class TlsSocket(socket.socket):
    """A connected socket whose bytes go through one TLS session."""

    _obj: ssl.SSLObject | None

    @classmethod
    def wrap(cls, sock: socket.socket) -> TlsSocket:
        """Take over a connected socket (its fd); TLS starts with ``handshake``."""
        timeout = sock.gettimeout()
        tls = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        tls.settimeout(timeout)
        tls._setup()
        return tls

    def _setup(self) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = None
        # One SSL object: never two threads inside OpenSSL at once (a reader and a writer
        # may share the connection); ciphertext leaves in the order it was made.
        self._ssl = threading.Lock()
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._bounce = bytearray(RECV_CHUNK)
        self._plain = bytearray()  # decrypted bytes read past a line (read_line)
        self._ready = threading.Event()
        self._ready.set()
        self._early: list[bytes] = []  # written before a background handshake finished
        self._failure: BaseException | None = None
        self.handshake_bytes = 0

    # ---- the handshake
    def handshake(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        hostname: str = "",
        session: ssl.SSLSession | None = None,
    ) -> None:
        obj = context.wrap_bio(
            self._in,
            self._out,
            server_side=server_side,
            server_hostname=None if server_side else hostname,
            session=session,
        )
        self._obj = obj
        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    # Small reads: nothing past the handshake is taken in before it is done.
                    n = socket.socket.recv_into(self, self._bounce, HANDSHAKE_READ)
                    if n == 0:
                        raise EOFError("the peer closed the connection") from None
                    self.handshake_bytes += n
                    if self.handshake_bytes > HANDSHAKE_LIMIT:
                        raise MigrationError(
                            f"the TLS handshake passed {HANDSHAKE_LIMIT} bytes: not a peer "
                            "that speaks vmferry's TLS"
                        ) from None
                    self._in.write(memoryview(self._bounce)[:n])
        except BaseException:
            # An alert OpenSSL queued tells the peer why (unknown CA, expired, …).
            with contextlib.suppress(OSError):
                self._flush()
            raise
        self._flush()

    def _flush(self) -> None:
        if self._out.pending:
            socket.socket.sendall(self, self._out.read())

    def mark_ready(self, failure: BaseException | None = None) -> None:
        """A background handshake ended: send what was written meanwhile (or fail it)."""
        with self._wlock:
            self._failure = failure
            early, self._early = self._early, []
            self._ready.set()
            if failure is None and early:
                self._send_locked(early)

    def defer_writes(self) -> None:
        """Writes are kept (small ones) until ``mark_ready``: the handshake runs elsewhere."""
        self._ready.clear()

    @property
    def session(self) -> ssl.SSLSession | None:
        return None if self._obj is None else self._obj.session

    @property
    def session_reused(self) -> bool:
        return self._obj is not None and self._obj.session_reused

    def getpeercert(self) -> dict[str, object] | None:
        if self._obj is None:
            return None
        return self._obj.getpeercert()  # type: ignore[return-value]

    def pending(self) -> int:
        """Bytes a read may return without the fd being readable (already taken in)."""
        with self._ssl:
            inside = 0 if self._obj is None else self._obj.pending() + self._in.pending
        return len(self._plain) + inside

    def cipher(self) -> tuple[str, str, int] | None:
        return None if self._obj is None else self._obj.cipher()

    # ---- writing
    def send_buffers(self, bufs: Sequence[Buffer]) -> None:
        if not self._ready.is_set():
            with self._wlock:
                if not self._ready.is_set() and sum(map(len, self._early)) < HANDSHAKE_LIMIT:
                    self._early.append(b"".join(bytes(b) for b in bufs))
                    return
            self._ready.wait()
        with self._wlock:
            if self._failure is not None:
                raise MigrationError(str(self._failure)) from self._failure
            self._send_locked(bufs)

    def _send_locked(self, bufs: Sequence[Buffer]) -> None:
        obj = self._obj
        assert obj is not None, "TLS write before the handshake"
        small = bytearray()
        for b in bufs:
            view = memoryview(b).cast("B")
            if len(view) < SMALL:
                small += view
                if len(small) < SMALL:
                    continue
                view, small = memoryview(bytes(small)), bytearray()
            elif small:
                self._encrypt_and_send(obj, memoryview(small))
                small = bytearray()
            self._encrypt_and_send(obj, view)
        if small:
            self._encrypt_and_send(obj, memoryview(small))

    def _encrypt_and_send(self, obj: ssl.SSLObject, view: memoryview) -> None:
        for i in range(0, len(view), CHUNK):
            with self._ssl:
                obj.write(view[i : i + CHUNK])
                data = self._out.read()
            socket.socket.sendall(self, data)

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        self.send_buffers([memoryview(data)])

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        view = memoryview(data)
        self.send_buffers([view])
        return view.nbytes

    # ---- reading
    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0, /) -> int:
        """Up to ``nbytes`` (one record at most) decrypted into ``buffer``; 0 at the end."""
        view = memoryview(buffer).cast("B")
        n = nbytes or len(view)
        with self._rlock:
            if self._plain:
                k = min(n, len(self._plain))
                view[:k] = self._plain[:k]
                del self._plain[:k]
                return k
            obj = self._obj
            assert obj is not None, "TLS read before the handshake"
            while True:
                try:
                    with self._ssl:
                        # With a buffer, read() returns the count (typeshed says bytes).
                        return cast(int, obj.read(n, view))
                except ssl.SSLWantReadError:
                    got = socket.socket.recv_into(self, self._bounce)
                    if got == 0:
                        return 0
                    with self._ssl:
                        self._in.write(memoryview(self._bounce)[:got])
                except ssl.SSLZeroReturnError:
                    return 0

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize)
        return bytes(buf[:n])

    def recv_exactly_into(self, view: memoryview) -> int:
        """Fill ``view`` (bytes, format "B"); fewer bytes only at the end of the stream.
        One call per stream read, not one per 16 KiB record: the loop is the hot path."""
        n = len(view)
        got = 0
        with self._rlock:
            if self._plain:
                got = min(n, len(self._plain))
                view[:got] = self._plain[:got]
                del self._plain[:got]
            obj = self._obj
            assert obj is not None, "TLS read before the handshake"
            lock, bio, bounce = self._ssl, self._in, self._bounce
            while got < n:
                try:
                    with lock:
                        got += cast(int, obj.read(n - got, view[got:]))
                except ssl.SSLWantReadError:
                    k = socket.socket.recv_into(self, bounce)
                    if k == 0:
                        break
                    with lock:
                        bio.write(memoryview(bounce)[:k])
                except ssl.SSLZeroReturnError:
                    break
        return got

    def read_line(self, limit: int) -> str:
        """One line (the destination's verdict); what follows it is kept for later reads."""
        line = bytearray()
        while b"\n" not in line:
            chunk = self.recv(4096)
            if not chunk:
                raise EOFError("the peer closed the connection")
            line += chunk
            if len(line) > limit:
                raise MigrationError("the peer sent an oversized TLS verdict")
        head, _, rest = bytes(line).partition(b"\n")
        with self._rlock:
            self._plain[:0] = rest
        return head.decode(errors="replace")


def stream_sink(sock: socket.socket) -> Sink:
    """The stream's sink on a migration socket: TLS or the plain fd (writev)."""
    return TlsSink(sock) if isinstance(sock, TlsSocket) else FdSink(sock.fileno(), owned=False)


def stream_source(sock: socket.socket, name: str) -> Source:
    """The stream's source on a migration socket: TLS or the plain fd (readv)."""
    if isinstance(sock, TlsSocket):
        return TlsSource(sock, name)
    return FdSource(sock.fileno(), owned=False, name=name)


class TlsSink:
    """Stream sink over a TlsSocket (the socket is owned by the migration)."""

    def __init__(self, sock: TlsSocket) -> None:
        self.sock = sock
        self.written = 0

    def write(self, bufs: Sequence[Buffer]) -> None:
        self.sock.send_buffers(bufs)
        self.written += sum(memoryview(b).nbytes for b in bufs)

    def close(self) -> None:
        pass


class TlsSource(ExactReader):
    """Reads exactly the bytes asked for, decrypted straight into the caller's buffer."""

    def __init__(self, sock: TlsSocket, name: str = "stream") -> None:
        super().__init__(name)
        self.sock = sock

    def readinto(self, buf: memoryview) -> None:
        view = byte_view(buf)
        got = self.sock.recv_exactly_into(view)
        if got < len(view):
            raise self._ends_early(got, len(view))
        self._pos += got

    def close(self) -> None:
        pass
