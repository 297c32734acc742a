"""The VM's arrival: the destination side of :class:`~vmferry.controller.VmController`.

``migrate-incoming`` (or ``--incoming``) takes the VM in on a thread while QMP answers
(``inmigrate``, as QEMU's destination does); query-migrate says how it goes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from vmferry.errors import VmferryError
from vmferry.machine.machine import Machine
from vmferry.migration import postcopy_commands as commands
from vmferry.migration import report
from vmferry.migration.destination import IncomingMigration, IncomingResult
from vmferry.migration.metrics import PostcopyFigures
from vmferry.migration.status import MigrationStatus
from vmferry.qmp.backend import QmpError

Emit = Callable[[str, dict[str, Any]], None]
MS = MigrationStatus


class Arrival:
    """VmController's incoming-migration commands; they work on its state, under its lock."""

    # The controller's state, set up by VmController.__init__.
    _machine: Machine | None
    make_incoming: Callable[[str], IncomingMigration] | None
    incoming_status: MigrationStatus | str
    incoming_error: str
    incoming: IncomingMigration | None
    incoming_result: IncomingResult | None
    emit: Emit
    finished: threading.Event
    _arrived: threading.Event
    _lock: threading.Lock

    def _finish(self, outcome: str) -> None:
        raise NotImplementedError  # VmController's: how this process's part ends

    def migrate_incoming(self, uri: str) -> None:
        with self._lock:
            if self._machine is not None or self.make_incoming is None:
                raise QmpError(
                    "this VM is already running; start vmferry with --incoming defer to "
                    "receive a migration"
                )
            if self.incoming_status in (MS.SETUP, MS.ACTIVE, MS.COMPLETED):
                raise QmpError("an incoming migration has already been started")
            try:
                incoming = self.make_incoming(uri)
            except VmferryError as e:
                raise QmpError(str(e)) from e
        self.receive(incoming)

    def receive(self, incoming: IncomingMigration) -> None:
        """Take the VM in from ``incoming`` on a thread; QMP answers meanwhile
        (``inmigrate``), as QEMU's does for ``-incoming``."""
        with self._lock:
            self.incoming = incoming
            # Listening, no source yet: QEMU's destination says "setup" until one connects.
            self.incoming_status = MS.SETUP
        self.emit("MIGRATION", {"status": MS.SETUP})
        incoming.on_connected = self._incoming_connected
        threading.Thread(
            target=self._receive, args=(incoming,), name="incoming", daemon=True
        ).start()

    def _incoming_connected(self) -> None:
        with self._lock:
            if self.incoming_status != MS.SETUP:
                return
            self.incoming_status = MS.ACTIVE
        self.emit("MIGRATION", {"status": MS.ACTIVE})

    def abandon_incoming(self) -> None:
        """Stop waiting for a VM that has not arrived (quit, a timeout, an interrupt)."""
        if self.incoming is not None and self._machine is None:
            self.incoming.close()

    def _receive(self, incoming: IncomingMigration) -> None:
        try:
            result = incoming.receive()
        except VmferryError as e:
            self.incoming_status, self.incoming_error = MS.FAILED, str(e)
            self.emit("MIGRATION", {"status": MS.FAILED})
            self._finish("incoming-failed")
            self._arrived.set()
            return
        if self.finished.is_set():
            # Quit (or gave up) while it was on its way: this process is ending.
            result.machine.close()
            return
        self.incoming_result = result
        self._machine = result.machine
        self.incoming_status = MS.COMPLETED
        self.emit("MIGRATION", {"status": MS.COMPLETED})
        self.emit("RESUME", {})
        self._arrived.set()

    def _query_incoming(self, status: MigrationStatus | str) -> dict[str, Any]:
        """query-migrate here with no migration started from here: the incoming one."""
        info: dict[str, Any] = {"status": status}
        if self.incoming_error:
            info["error-desc"] = self.incoming_error
        res = self.incoming_result
        if res is not None and res.postcopy:
            # What the vCPUs waited here, as QEMU's destination reports it after.
            waited = PostcopyFigures(True, blocktime_ms=res.postcopy.get("blocktime_ms", 0.0))
            info.update(report.blocktime_dict(waited))
        inc = self.incoming
        if status == MS.SETUP and inc is not None:
            # Where it listens, as QEMU's destination says while it waits.
            info["socket-address"] = [{"type": "inet", "host": inc.uri.host, "port": str(inc.port)}]
        return info

    def _incoming_state(self) -> MigrationStatus | str:
        """The destination's status: the engine's own once post-copy runs (the VM runs
        here while pages still come, the link may break and be re-made)."""
        inc = self.incoming
        if inc is not None and inc.status in commands.POSTCOPY:
            return inc.status
        return self.incoming_status
