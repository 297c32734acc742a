"""The source's actions once a migration switches to post-copy (MigrationSource's, for
the table's POSTCOPY_* rows).

At the switch: the owed pages' record (PCPY) and two page channels opened beside the
main connection, each with a hello naming the migration — the urgent one carries the
destination's page requests and their answers, the background one the push of every
other owed page (QEMU's postcopy-preempt idea: an answer never waits behind the push).
After ``go``: the page server (page_server.py) on them, the source's RAM frozen. Then the
wait for the destination's ``landed``; the figures (stats.postcopy) as they move.

After ``go`` the VM's state is split: anything that ends post-copy before the last page
landed loses the VM; the error says so in one line (``POSTCOPY_LOST``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time

from vmferry.errors import ConfigError, MigrationError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.memory.dirty import DirtyBitmap
from vmferry.migration.channel import MigrationUri, PeerSilent, parse_uri
from vmferry.migration.codec import (
    PCPY,
    PCPY_HEAD,
    ROLE_BACKGROUND,
    ROLE_RESUME,
    ROLE_URGENT,
    Failed,
    Landed,
    OwedRecord,
    PostcopyHello,
)
from vmferry.migration.connector import TcpConnector
from vmferry.migration.failure import LinkBroken
from vmferry.migration.figures import LiveFigures
from vmferry.migration.handover import Handover, StillReleased
from vmferry.migration.link import DestinationLink
from vmferry.migration.liveness import bound_socket, receive_timeout
from vmferry.migration.postcopy.page_requests import PageRequestError
from vmferry.migration.postcopy.page_server import PageServer, Served
from vmferry.migration.postcopy.pages import SentPages
from vmferry.migration.source_machine import SourceEvent
from vmferry.migration.stream import StreamWriter
from vmferry.migration.tls import TlsClient
from vmferry.migration.tlssocket import stream_sink, stream_source

log = logging.getLogger(__name__)
Ev = SourceEvent

POSTCOPY_LOST = (
    "the destination was lost during post-copy: the VM ran only there and is lost; "
    "the source keeps the VM's memory until quit"
)
# The page server stopped on a bad request (or could not send): the same split state.
POSTCOPY_BROKE = (
    "post-copy stopped ({}): the VM ran only at the destination, which cannot run it on "
    "without its missing pages; the source keeps the VM's memory until quit"
)
# The push's socket buffers, each side: a requested page the push already sent is at
# most this far behind in its queue (TCP's 4 MiB on both sides held 16 MiB in flight, a
# few hundred ms of landing under load).
PUSH_BUFFER = 256 << 10
# The destination gave up (a bad page run, say) and stopped the guest there.
POSTCOPY_REFUSED = (
    "the destination stopped post-copy ({}): the VM ran only there and is lost; the "
    "source keeps the VM's memory until quit"
)
FIGURES_EVERY_S = 0.5  # how often the figures move while the pages go
# No cap on the wait for "landed": the push takes as long as the link needs, and a
# destination that stops answering is given up by the watch (x-peer-timeout).


class PostcopySource:
    """One migration's post-copy on the source: the owed pages, their channels, the
    page server, the wait for the last page to land there."""

    def __init__(
        self,
        machine: Machine,
        figures: LiveFigures,
        link: DestinationLink,
        tls: TlsClient | None,
        *,
        max_bandwidth: int = 0,
    ) -> None:
        self.machine = machine
        self.figures = figures
        self.max_bandwidth = max_bandwidth  # max-bandwidth (0: none): the push keeps it
        self.link = link
        self.tls = tls
        self.owed: DirtyBitmap | None = None
        self.server: PageServer | None = None
        self._socks: dict[int, socket.socket] = {}  # role → socket
        self._hellos: list[threading.Thread] = []
        self.mig_id = ""
        # migrate resume's targets, checked; None: no resume will come (give_up)
        self._resume: queue.Queue[MigrationUri | None] = queue.Queue()
        self._before = Served()  # what the page servers of broken links sent
        self._hello_error: BaseException | None = None
        self._t_switch = 0.0

    # ---- the switch (VM paused, devices stopped)
    def owe(self, owed: DirtyBitmap) -> None:
        self.owed = owed
        self._t_switch = time.monotonic()
        with self.figures.lock:
            pc = self.figures.stats.postcopy
            pc.active = True
            pc.switch_s = self._t_switch - self.figures.t0
            pc.owed_pages = owed.count()

    def send_owed(self, main: StreamWriter) -> None:
        assert self.owed is not None, "the owed pages are known at the last sync"
        main.section(PCPY, OwedRecord(self.owed.npages, self.owed.words).encode())

    def open_channels(self, mig_id: str, first_index: int) -> None:
        self.mig_id = mig_id
        """The urgent and the background page channel, connected, bounded by
        x-peer-timeout and introduced. The destination accepts them only after END, so
        a TLS handshake and the hello go on a thread each (``serve`` waits for them)."""
        for n, role in enumerate((ROLE_URGENT, ROLE_BACKGROUND)):
            index = first_index + n
            s = self.link.connector.connect(index, self.link.peer_timeout_s)
            if self.tls is not None:
                s = self.tls.secure_later(s, index)
            self.link.socks.append(s)  # woken and closed with the others
            if role == ROLE_BACKGROUND:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PUSH_BUFFER)
            bound_socket(s, self.link.peer_timeout_s)
            self._socks[role] = s
            hello = PostcopyHello(mig_id, role).encode()
            t = threading.Thread(
                target=self._introduce, args=(s, hello), name=f"pc-hello{role}", daemon=True
            )
            t.start()
            self._hellos.append(t)

    def _introduce(self, s: socket.socket, hello: bytes) -> None:
        try:
            stream_sink(s).write([hello])
        except BaseException as e:  # serve() reports it
            self._hello_error = e

        # ---- after "go"

    def channels_ready(self) -> None:
        """The page channels' TLS handshakes and hellos went through (the destination
        takes them before its "ready"): checked before "go", so that a failure here
        still rolls the VM back."""
        for t in self._hellos:
            t.join(self.link.peer_timeout_s)
        if self._hello_error is not None or any(t.is_alive() for t in self._hellos):
            why = self._hello_error or "timed out"
            raise MigrationError(f"could not open post-copy's page channels: {why}")

    def serve(self) -> None:
        """The page server on the page channels: the destination's requests first, then
        the push of every owed page not sent yet (none twice)."""
        assert self.owed is not None
        self.channels_ready()
        sent = SentPages(self.owed.npages)
        sent.bitmap.set_all()
        sent.bitmap.words &= ~self.owed.words  # what it holds (or fills itself) is "sent"
        self._start_server(sent)

    def _start_server(self, sent: SentPages) -> None:
        urgent, background = self._socks[ROLE_URGENT], self._socks[ROLE_BACKGROUND]
        self.server = PageServer(
            self.machine.memory.bytes,
            stream_source(urgent, "page requests"),
            stream_sink(urgent),
            stream_sink(background),
            sent=sent,
            max_bandwidth=self.max_bandwidth or None,
        ).start()

    def await_landed(self, hand: Handover, audit: bool) -> SourceEvent:
        """Until the destination says the last owed page landed; its figures kept."""
        server = self.server
        assert server is not None, "the page server starts with go"
        try:
            while True:
                self._figures(None)
                if _bad_input(server.error) and not hand.watch.lost:
                    raise StillReleased(POSTCOPY_BROKE.format(server.error))
                try:
                    msg = hand.watch.next(FIGURES_EVERY_S, "the last page to land")
                except PeerSilent:
                    if hand.watch.silent:
                        raise
                    continue
                if isinstance(msg, Landed):
                    break
                if isinstance(msg, Failed):
                    raise StillReleased(POSTCOPY_REFUSED.format(msg.error))
                raise MigrationError(f"the destination sent {msg.KIND!r} during post-copy")
        except StillReleased:
            raise
        except (VmferryError, OSError) as e:
            if hand.watch.silent or (hand.watch.lost and not hand.watch.eof):
                # Reset or silent, not closed: a broken link, not a destination gone.
                raise LinkBroken(f"post-copy's link broke ({e}): paused") from e
            raise StillReleased(f"{POSTCOPY_LOST} ({e})") from e
        self._figures(msg)
        return Ev.PAGES_LANDED_UNAUDITED if audit else Ev.PAGES_LANDED

    # ---- a broken link (postcopy-paused)
    def resume(self, uri: str) -> None:
        """migrate resume: ``uri`` checked now (a MigrationError naming it), the new link
        made on the migration's thread."""
        self._resume.put(resume_target(uri))

    def give_up(self) -> None:
        """No resume will come (cancel, a source that ends): the VM is lost there."""
        self._resume.put(None)

    def await_resume(self) -> DestinationLink:
        """Until a migrate resume's URI gives a link that works: the page channels and a
        new main connection, the destination's present pages read back (what it holds
        counts as sent), the page server again. A failed try waits for the next one."""
        self.close()
        while True:
            target = self._resume.get()
            if target is None:
                raise StillReleased(f"{POSTCOPY_LOST} (given up while paused)")
            try:
                return self._relink(target)
            except (VmferryError, OSError) as e:
                log.warning("migrate resume %s failed, still paused: %s", target, e)
                with self.figures.lock:
                    self.figures.stats.error = f"migrate resume {target}: {e}"

    def _relink(self, target: MigrationUri) -> DestinationLink:
        assert self.owed is not None
        timeout = self.link.peer_timeout_s
        link = DestinationLink(TcpConnector(target), self.tls, timeout)
        try:
            for index, role in enumerate((ROLE_RESUME, ROLE_URGENT, ROLE_BACKGROUND)):
                s = link.connector.connect(index, timeout)
                if self.tls is not None:
                    s = self.tls.secure(s, index)
                link.socks.append(s)
                bound_socket(s, timeout)
                stream_sink(s).write([PostcopyHello(self.mig_id, role).encode()])
            main = link.socks[0]
            receive_timeout(main, timeout)
            npages = self.owed.npages
            raw = bytearray(PCPY_HEAD.size + 8 * ((npages + 63) // 64))
            stream_source(main, "the present pages").readinto(memoryview(raw))
            present = OwedRecord.decode(bytes(raw), "the destination's present pages", npages)
            receive_timeout(main, 0.0)
            link.watch_peer(lambda: False)
        except BaseException:
            link.close()
            raise
        sent = SentPages(npages)
        sent.bitmap.words[:] = present.words
        if self.server is not None:  # its pages that landed count; the rest go again
            old = self.server.served
            b = self._before
            b.requests += old.requests
            b.urgent_pages += old.urgent_pages
            b.background_pages += old.background_pages
        self.link = link
        self._socks = {ROLE_URGENT: link.socks[1], ROLE_BACKGROUND: link.socks[2]}
        link.socks[2].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PUSH_BUFFER)
        self._start_server(sent)
        with self.figures.lock:
            self.figures.stats.postcopy.recoveries += 1
            self.figures.stats.error = ""
        return link

    def _figures(self, landed: Landed | None) -> None:
        server = self.server
        if server is None:
            return
        served = server.served
        before = self._before
        with self.figures.lock:
            pc = self.figures.stats.postcopy
            pc.requests = before.requests + served.requests
            pc.urgent_pages = before.urgent_pages + served.urgent_pages
            pc.pushed_pages = before.background_pages + served.background_pages
            pc.bytes = (pc.urgent_pages + pc.pushed_pages) * 4096
            # query-migrate's ram.remaining: what is still owed
            sent = pc.urgent_pages + pc.pushed_pages
            self.figures.stats.remaining = max(0, pc.owed_pages - sent) * 4096
            if landed is not None:
                pc.complete_s = time.monotonic() - self.figures.t0
                pc.blocktime_ms = landed.blocktime_ms
                pc.vcpu_blocktime_ms = list(landed.vcpu_blocktime_ms)
                pc.latency_ms = {
                    "p50": landed.latency_p50_ms,
                    "p99": landed.latency_p99_ms,
                    "max": landed.latency_max_ms,
                }
                self.figures.stats.remaining = 0

    def close(self) -> None:
        """The page server stopped: its channels shut down first (a send blocked on a
        silent destination, the request reader's wait), then its threads joined."""
        for s in self._socks.values():
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        if self.server is not None:
            self.server.stop()
            self.server.join(5)


def resume_target(uri: str) -> MigrationUri:
    """migrate resume's URI: tcp:HOST:PORT (where the destination's migrate-recover
    listens), or a MigrationError in one line naming what was given."""
    try:
        target = parse_uri(uri)
    except ConfigError:
        target = None
    if target is None or target.scheme != "tcp" or target.port == 0:
        raise MigrationError(
            f"post-copy resumes over tcp:HOST:PORT only (the address migrate-recover "
            f"listens on), not {uri!r}"
        )
    return target


__all__ = [
    "POSTCOPY_BROKE",
    "POSTCOPY_LOST",
    "POSTCOPY_REFUSED",
    "PostcopySource",
    "resume_target",
]


def _bad_input(error: BaseException | None) -> bool:
    """The page server stopped on what the destination sent, not on the link."""
    return isinstance(error, PageRequestError) or (
        error is not None and not isinstance(error.__cause__, OSError)
    )
