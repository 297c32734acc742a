"""The transport seam: how a migration's channels are opened, at either end.

The source asks a ``Connector`` for channel ``index`` (0 is the main one, with the reply
path); the destination asks an ``Acceptor`` for the next connection. Over the network
these are TCP (``TcpConnector``, ``TcpAcceptor``: ``channel.connect``/``listen``/
``accept``, with their options and errors); ``vmferry.testing.transport.socket_link``
joins the two ends inside one process without a TCP port. Whatever carries them, a
channel is a connected stream socket, so TLS, the reply path and the stream reader work
on it unchanged.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Protocol

from vmferry.migration.channel import MigrationUri, accept, connect, listen


class Connector(Protocol):
    """The source's side: opens the migration's channels, one connection each."""

    def connect(self, index: int, timeout_s: float) -> socket.socket:
        """A connected socket for channel ``index`` (0 = main); MigrationError if the
        destination cannot be reached within ``timeout_s``."""
        ...


class Acceptor(Protocol):
    """The destination's side: hands over the connections that arrive, in order."""

    @property
    def port(self) -> int:
        """Where it listens (0 where there is no port)."""
        ...

    def accept(self, timeout_s: float | None, what: str) -> socket.socket:
        """The next connection (``timeout_s`` None: wait forever); MigrationError "no
        {what} connected within N s" when none came; OSError once closed."""
        ...

    def close(self) -> None:
        """Stop accepting: an ``accept`` blocked on another thread returns (with OSError)
        now. Connections already handed over are not touched; closing twice is fine."""
        ...


class TcpConnector:
    """Channels to ``tcp:HOST:PORT``, each its own TCP connection."""

    def __init__(self, uri: MigrationUri) -> None:
        self.uri = uri

    def connect(self, index: int, timeout_s: float) -> socket.socket:
        # Every channel goes to the same address: the destination tells them apart by
        # their first section (CONF on the main one, CHAN on the others).
        return connect(self.uri, timeout=timeout_s)


class TcpAcceptor:
    """A listening TCP socket on ``uri`` (port 0: a free one, read back from ``port``)."""

    def __init__(self, uri: MigrationUri) -> None:
        self.uri = uri
        self.listener = listen(uri)
        self._port: int = self.listener.getsockname()[1]

    @property
    def port(self) -> int:
        return self._port

    def accept(self, timeout_s: float | None, what: str) -> socket.socket:
        return accept(self.listener, timeout_s, what)

    def close(self) -> None:
        # shutdown(2) wakes a thread blocked in accept(2); close(2) alone would not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


__all__ = ["Acceptor", "Connector", "TcpAcceptor", "TcpConnector"]
