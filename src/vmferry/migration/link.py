"""A live migration's connection to its destination: the channels (TLS on each when
asked), the reply path and the watch that reads it, and the ways to wake or tell the
destination when the source gives up.

A file has no link: nothing to watch, no one to tell.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from vmferry.migration.channel import ReplyPath
from vmferry.migration.codec import ABRT, Abandon, AbandonNotice
from vmferry.migration.connector import Connector
from vmferry.migration.handover import Handover
from vmferry.migration.liveness import PeerWatch, bound_socket, shutdown_all
from vmferry.migration.stream import StreamWriter
from vmferry.migration.tls import TlsClient
from vmferry.migration.transport import Sink

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 1.0  # how long a cancel lets the senders reach a section boundary

# How a channel's socket becomes a stream (the source's names, which tests replace).
SinkFor = Callable[[socket.socket], Sink]
WriterFor = Callable[[Sink], StreamWriter]


class DestinationLink:
    """The sockets of one live migration and the reading of its reply path."""

    def __init__(self, connector: Connector, tls: TlsClient | None, peer_timeout_s: float) -> None:
        self.connector = connector
        self.tls = tls
        self.peer_timeout_s = peer_timeout_s
        self.socks: list[socket.socket] = []
        self.main: StreamWriter | None = None
        self.watch: PeerWatch | None = None
        self.handover: Handover | None = None
        self.released = False  # set once "go" is out: a lost peer no longer wakes sends
        self._cancel_timer = threading.Timer(CANCEL_GRACE_S, shutdown_all, args=(self.socks,))
        self._cancel_timer.daemon = True

    def open(self, channels: int, sink_for: SinkFor, writer_for: WriterFor) -> list[StreamWriter]:
        """Every channel connected, bounded (x-peer-timeout) and, with TLS, secured (the
        extra channels handshake on a thread)."""
        writers = []
        for i in range(channels):
            s = self.connector.connect(i, self.peer_timeout_s)
            if self.tls is not None:
                s = self.tls.secure(s, i) if i == 0 else self.tls.secure_later(s, i)
            self.socks.append(s)
            bound_socket(s, self.peer_timeout_s)
            writers.append(writer_for(sink_for(s)))
        self.main = writers[0]
        return writers

    def watch_peer(self, cancelled: Callable[[], bool]) -> None:
        """Read the reply path on its own thread (heartbeats, answers)."""
        reply = ReplyPath(self.socks[0])
        watch = PeerWatch(reply, self.peer_timeout_s, self._peer_lost)
        self.handover = Handover(reply, watch)
        self.watch = watch
        watch.start()
        if cancelled():  # cancelled before there was a watch to wake
            watch.cancel()

    def _peer_lost(self) -> None:
        # The watch declared the destination dead: wake the sends blocked on it.
        if not self.released:
            shutdown_all(self.socks)

    def interrupt(self) -> None:
        """A cancel: a wait for the destination's answer ends now; a send blocked on a
        peer that reads nothing is woken a little later (the senders stop at their next
        batch first, so the destination can still be told why)."""
        self._cancel_timer.start()
        if self.watch is not None:
            self.watch.cancel()

    def tell(self, notice: AbandonNotice, *, stream_ended: bool) -> None:
        """Why the source gives up, so that the destination can say so instead of "the
        stream ends early": an ABRT section while sections flow, an ``abandon`` line once
        END is out. Not to a destination that is gone, or failed first and said why."""
        watch = self.watch
        if self.main is None or watch is None or watch.silent or watch.failure:
            return
        try:
            if stream_ended:
                watch.reply.send(Abandon(notice.reason, notice.cancelled))
            else:
                self.main.section(ABRT, [notice.encode()])
        except OSError as err:
            log.info("could not tell the destination why the migration ended: %s", err)

    def close(self) -> None:
        self._cancel_timer.cancel()
        if self.watch is not None:
            self.watch.stop()
        for s in self.socks:
            s.close()


__all__ = ["CANCEL_GRACE_S", "DestinationLink"]
