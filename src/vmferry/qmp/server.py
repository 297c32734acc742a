"""The QMP control socket: a Unix socket, one thread per client, events to all of them."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from vmferry.qmp.backend import QmpBackend
from vmferry.qmp.framing import encode
from vmferry.qmp.protocol import QmpSession, event_message, greeting

log = logging.getLogger(__name__)

#: A client that stops reading is dropped after this long, so it cannot block events.
SEND_TIMEOUT_S = 5
_JOIN_TIMEOUT_S = 2.0


class _Client:
    """One connection: its socket, its session, and the lock that keeps writes whole."""

    def __init__(self, sock: socket.socket, session: QmpSession) -> None:
        self.sock = sock
        self.session = session
        self.write_lock = threading.Lock()
        # Set only after the negotiation reply is written, so no event can precede it.
        self.events_enabled = False
        self.alive = True
        self.thread: threading.Thread | None = None

    def send(self, data: bytes) -> None:
        """Write `data` whole under the lock; a failed write ends the connection."""
        with self.write_lock:
            self._send_locked(data)

    def _send_locked(self, data: bytes) -> None:
        if not self.alive:
            return
        try:
            self.sock.sendall(data)
        except OSError as e:
            log.info("QMP client dropped: %s", e)
            self._shutdown()

    def send_event(self, data: bytes) -> None:
        with self.write_lock:
            if self.events_enabled:
                self._send_locked(data)

    def send_reply(self, data: bytes) -> None:
        with self.write_lock:
            self._send_locked(data)
            self.events_enabled = self.session.negotiated

    def close(self) -> None:
        # Under the lock, so no writer can be holding a descriptor number the kernel reuses.
        with self.write_lock:
            self.alive = False
            self.sock.close()

    def hang_up(self) -> None:
        with self.write_lock:
            self._shutdown()

    def _shutdown(self) -> None:
        # shutdown, not close: it wakes the client's thread out of recv(), which closes.
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class QmpServer:
    """A QMP server on the Unix socket `path` (mode 0600), answering for `backend`."""

    def __init__(self, path: str, backend: QmpBackend) -> None:
        self.path = path
        self._backend = backend
        self._backend_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _clients and _closing
        self._clients: list[_Client] = []
        self._closing = False
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._accept_thread: threading.Thread | None = None

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def listen(self) -> None:
        """Create the socket now; clients that connect wait in the backlog until
        :meth:`start`. (A bad path then fails before a VM is set up.)"""
        if self._listener is None:
            self._listener = self._listen()

    def start(self) -> None:
        """Create the socket (unless :meth:`listen` did) and accept clients in a daemon
        thread."""
        if self._accept_thread is not None:
            raise RuntimeError(f"QMP server on {self.path} already started")
        self.listen()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"qmp-accept {self.path}", daemon=True
        )
        self._accept_thread.start()

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every client that has completed negotiation."""
        message = event_message(event, data)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.send_event(message)

    def close(self) -> None:
        """Stop accepting, hang up on every client, remove the socket file."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            clients = list(self._clients)
        if self._listener is not None:
            # shutdown wakes the accept thread out of accept() on Linux.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._remove_socket_file()
        for client in clients:
            client.hang_up()
        # close() may run on a client's thread (a backend's quit); never join oneself.
        me = threading.current_thread()
        threads = [self._accept_thread, *(c.thread for c in clients)]
        for thread in threads:
            if thread is not None and thread is not me:
                thread.join(_JOIN_TIMEOUT_S)

    def _listen(self) -> socket.socket:
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the unbound socket's mode (less the umask),
            # so it is never wider than 0600, not even between bind() and a chmod().
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(self.path)
            st = os.stat(self.path)
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(self.path, 0o600)  # a kernel that ignored fchmod; close it at once
            self._inode = (st.st_dev, st.st_ino)
            sock.listen()
        except BaseException:
            sock.close()
            raise
        return sock

    def _remove_stale_socket(self) -> None:
        # A socket file left by a process that died; anything else is not ours to remove.
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise FileExistsError(f"{self.path} is in use by another QMP server")

    def _remove_socket_file(self) -> None:
        # Only the file this server created: another server may have replaced it since.
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._closing:
                    return
                log.exception("QMP accept on %s failed", self.path)
                return
            self._add_client(sock)

    def _add_client(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
        client = _Client(sock, QmpSession(self._backend, self._backend_lock))
        with self._lock:
            if self._closing:
                sock.close()
                return
            self._clients.append(client)
        client.thread = threading.Thread(
            target=self._serve, args=(client,), name=f"qmp-client {self.path}", daemon=True
        )
        client.thread.start()

    def _serve(self, client: _Client) -> None:
        try:
            client.send(encode(greeting()))
            while client.alive:
                try:
                    data = client.sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                for reply in client.session.feed(data):
                    client.send_reply(reply)
        except Exception:
            log.exception("QMP client on %s failed", self.path)
        finally:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()
