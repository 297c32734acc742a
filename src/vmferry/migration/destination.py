"""The destination side: accept a migration, load and verify it, resume only on ``go``.

Every failure is reported to the source on the reply path (so it resumes its VM) and
raised here with what went wrong; no guest is ever started from a stream that was not
read to its end and verified. What happens when is the receiver's table
(``receiver_machine``), driven by ``reception.Reception``; connections come through an
``Acceptor`` (``connector``): TCP by default, any stream socket in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import BinaryIO

from vmferry.errors import MigrationError
from vmferry.kvm.system import DEFAULT_DEVICE
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.channel import MigrationUri, parse_uri
from vmferry.migration.connector import Acceptor, TcpAcceptor
from vmferry.migration.incoming import DEFAULT_PEER_TIMEOUT_S, IncomingResult
from vmferry.migration.postcopy.switch import NO_PAUSE
from vmferry.migration.receiver_events import ReceiverState
from vmferry.migration.reception import Reception
from vmferry.migration.status import MigrationStatus
from vmferry.migration.tls import TlsServer

log = logging.getLogger(__name__)


class IncomingMigration:
    """Waits on tcp:HOST:PORT (or ``acceptor``) for one migration and returns the
    running machine."""

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
        acceptor: Acceptor | None = None,
    ) -> None:
        """``prealloc``: allocate this much guest RAM now, before anything arrives (as
        QEMU's -mem-prealloc does): a fresh page costs more to receive into than the
        network does to carry it. Used if the VM that comes has exactly this size.
        ``acceptor``: where connections come from (a TcpAcceptor on ``uri`` if None)."""
        self.uri = uri
        self.kvm_device = kvm_device
        self.serial = serial
        self.announce = announce
        self.device_versions = device_versions or {}
        self.tls = tls  # when set, every connection is TLS with an admitted client
        self.acceptor: Acceptor = acceptor if acceptor is not None else TcpAcceptor(uri)
        self.port = self.acceptor.port
        self.status = MigrationStatus.NONE  # as the receiver's table reports it
        # Called (on the receiving thread) once a source has connected and, with TLS,
        # been admitted: the wait (QEMU's "setup") is over, the migration is "active".
        self.on_connected: Callable[[], None] | None = None
        # One line per stranger's connection refused while waiting (the test reads them).
        self.refusals: list[str] = []
        self._prealloc: GuestMemory | None = None
        self._reception: Reception | None = None
        self.recover_port = 0  # where migrate-recover listens
        self._recovering: TcpAcceptor | None = None  # its listener, until the try ends
        if prealloc:
            try:
                self._prealloc = GuestMemory(prealloc)
                self._prealloc.populate()
            except BaseException:
                self.acceptor.close()
                if self._prealloc is not None:
                    self._prealloc.close()
                raise

    def take_prealloc(self) -> GuestMemory | None:
        """The pre-allocated RAM, now the caller's (None if there is none, or no more)."""
        memory, self._prealloc = self._prealloc, None
        return memory

    def memory_for(self, size: int) -> GuestMemory:
        """Guest RAM for a VM of ``size`` bytes: the pre-allocated RAM if it fits."""
        memory = self.take_prealloc()
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
        self.acceptor.close()

    def pause_postcopy(self) -> None:
        """QMP migrate-pause on the destination: refused in one line (see the source's)."""
        raise MigrationError(NO_PAUSE)

    def recover(self, uri: str) -> None:
        """QMP migrate-recover: listen on ``uri`` (now: a bad URI or a busy port fails
        here) for the source's ``migrate`` with resume; ``recover_port`` is where. One at a
        time: a second while the first still listens replaces it (the first's port is
        closed, a try on it fails): the source may have given up a try that this side
        still waits in (a hello, the next channel), and the new one must not queue
        behind it."""
        r = self._reception
        if r is None or r.postcopy is None or r.walk.state is not ReceiverState.POSTCOPY_PAUSED:
            raise MigrationError(f"post-copy is not paused here (it is {self.status})")
        target = parse_uri(uri)
        if target.scheme != "tcp":
            raise MigrationError(f"post-copy recovers over tcp:HOST:PORT only, not {uri!r}")
        pending = self._recovering
        if pending is not None and pending.listener.fileno() != -1:  # closed once tried
            log.warning(
                "migrate-recover %s replaces the one listening on port %d", uri, pending.port
            )
            pending.close()
        acceptor = TcpAcceptor(target)
        self.recover_port = acceptor.port
        self._recovering = acceptor
        r.postcopy.recover_with(acceptor)

    def receive(self) -> IncomingResult:
        self._reception = Reception(self)
        return self._reception.run()


__all__ = ["DEFAULT_PEER_TIMEOUT_S", "IncomingMigration", "IncomingResult"]
