"""One live migration inside this process: a source ``Machine`` to an ``IncomingMigration``
receiving on its own thread, over loopback tcp on a free port, or over a ``Link``
(``transport.socket_link()``: kernel memory, no TCP port).

The migration tests, the traffic lab and the device benchmarks share it. Options go where
they belong: the destination's (device versions, pre-allocation, TLS, the host it runs
on) to ``InProcessDestination``, the source's (parameters, capabilities: channels, TLS
credentials, limits) to ``migrate``.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Self

from vmferry.machine import Machine
from vmferry.migration.channel import parse_uri
from vmferry.migration.connector import Acceptor, Connector
from vmferry.migration.destination import IncomingMigration, IncomingResult
from vmferry.migration.metrics import MigrationStats
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import EventSink, MigrationSource
from vmferry.migration.status import MigrationStatus
from vmferry.migration.tls import TlsServer

LOOPBACK = "tcp:127.0.0.1:0"
TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 10.0

# Entered around the destination's set-up and around its receive (on its thread): the
# NIC model finds "this host" in a context variable, which a new thread does not inherit.
Scope = Callable[[], AbstractContextManager[object]]
# A source's connector joined to a destination's acceptor (transport.socket_link()).
Link = tuple[Connector, Acceptor]


class InProcessDestination:
    """``IncomingMigration`` on tcp:127.0.0.1:<free port> (or the acceptor of ``link``),
    receiving on its own thread from the moment it is made; ``result`` or ``error`` once
    it has ended."""

    def __init__(
        self,
        *,
        serial: io.BytesIO | None = None,
        device_versions: dict[str, int] | None = None,
        prealloc: int = 0,
        tls: TlsServer | None = None,
        scope: Scope | None = None,
        thread_name: str = "destination",
        link: Link | None = None,
    ) -> None:
        self.serial = serial if serial is not None else io.BytesIO()
        self._scope: Scope = scope or contextlib.nullcontext
        # How a source reaches it: None is TCP to ``uri``.
        self.connector: Connector | None = None if link is None else link[0]
        with self._scope():
            self.incoming = IncomingMigration(
                parse_uri(LOOPBACK),
                serial=self.serial,
                announce=False,
                device_versions=device_versions,
                prealloc=prealloc,
                tls=tls,
                acceptor=None if link is None else link[1],
            )
        self.port: int = self.incoming.port
        self.result: IncomingResult | None = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None  # time.monotonic() when receive returned
        self._thread = threading.Thread(target=self._receive, name=thread_name, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _receive(self) -> None:
        with self._scope():
            try:
                self.result = self.incoming.receive()
            except BaseException as e:  # handed to the caller's thread
                self.error = e
            finally:
                self.ended_at = time.monotonic()

    def waiting(self) -> bool:
        """Still receiving, or still waiting for a source."""
        return self._thread.is_alive()

    def wait(self, timeout: float | None = TIMEOUT_S) -> bool:
        """Whether receive ended within ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop_waiting(self) -> None:
        """A receive blocked in accept (for the source or one of its channels) fails now;
        one reading a connection is not disturbed."""
        self.incoming.close()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop waiting and free the VM that arrived, if one did."""
        self.stop_waiting()
        self.wait(timeout)
        if self.result is not None:
            self.result.machine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class MigrationRun:
    """A migration that has ended on both sides. The destination's VM, if it took it over,
    runs on: the caller finishes it, or ``close`` frees it."""

    source: MigrationSource
    destination: InProcessDestination
    source_s: float  # from the source's start until it ended
    wall_s: float  # from the source's start until both sides had ended

    @property
    def stats(self) -> MigrationStats:
        return self.source.stats

    @property
    def result(self) -> IncomingResult | None:
        return self.destination.result

    @property
    def error(self) -> BaseException | None:
        return self.destination.error

    @property
    def completed(self) -> bool:
        """The source handed the VM over and the destination took it."""
        return self.stats.status == MigrationStatus.COMPLETED and self.result is not None

    def close(self) -> None:
        self.destination.close()


def _await_both(
    src: MigrationSource, dest: InProcessDestination, t0: float, timeout_s: float
) -> float:
    """Wait for the source, then the destination, to end (each within ``timeout_s``);
    the source's time since ``t0``."""
    if not src.wait(timeout_s):
        raise TimeoutError(f"the migration did not end within {timeout_s} s")
    source_s = time.monotonic() - t0
    if src.stats.status != MigrationStatus.COMPLETED:
        dest.stop_waiting()  # a source that failed early may never have connected
    if not dest.wait(timeout_s):
        raise TimeoutError(
            f"the destination still runs {timeout_s} s after the source ended ({src.stats.status})"
        )
    return source_s


def migrate(
    machine: Machine,
    *,
    destination: InProcessDestination | None = None,
    link: Link | None = None,
    params: MigrationParameters | None = None,
    caps: MigrationCapabilities | None = None,
    on_event: EventSink | None = None,
    during: Callable[[MigrationSource], None] | None = None,
    timeout_s: float = TIMEOUT_S,
    after_final_sync: Callable[[Machine], None] | None = None,
) -> MigrationRun:
    """Migrate the running ``machine`` to ``destination`` (a plain one if None, on
    ``link`` if given) and wait until both sides have ended, each within ``timeout_s``.

    ``during`` runs on this thread once the source has started (to act on the guest or
    the source while it migrates, or to cancel it). ``after_final_sync`` (test-only) is
    called with the source machine after its last dirty sync and final send, to write
    through the VMM's own mapping behind the tracking's back. A failed migration is a
    ``MigrationRun`` too, with the source's status and the destination's error; a
    migration that outlives ``timeout_s`` is cancelled, and everything is closed before
    the ``TimeoutError`` (or whatever ``during`` raised) reaches the caller.
    """
    if destination is not None and link is not None:
        raise ValueError("a link is the destination's: give it to InProcessDestination")
    dest = destination if destination is not None else InProcessDestination(link=link)
    src: MigrationSource | None = None
    started = False
    try:
        src = MigrationSource(
            machine,
            dest.uri,
            params or MigrationParameters(),
            caps or MigrationCapabilities(),
            on_event=on_event,
            connector=dest.connector,
            after_final_sync=after_final_sync,
        )
        t0 = time.monotonic()
        src.start()
        started = True
        if during is not None:
            during(src)
        source_s = _await_both(src, dest, t0, timeout_s)
    except BaseException:
        if src is not None and started and not src.done.is_set():
            src.cancel("the test harness gave up on the migration")
            src.wait(CLOSE_TIMEOUT_S)
        dest.close()
        raise
    # The destination may end first: its verdict reaches the source after it returned.
    ended = max(t0 + source_s, dest.ended_at or time.monotonic())
    return MigrationRun(src, dest, source_s=source_s, wall_s=ended - t0)
