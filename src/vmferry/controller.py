"""One VM under control: run state, migrations, and the QMP commands that drive them.

It implements ``vmferry.qmp.backend.QmpBackend``; the CLI uses it with or without a QMP
socket. The rule it enforces: once a migration has handed the VM over to a destination,
the VM never runs here again (``cont`` is refused), and a failed migration leaves it as it
was. After a migration to a file the VM is paused (postmigrate) and ``cont`` runs it on,
as QEMU's does: the file is a copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from vmferry.arrival import Arrival, Emit
from vmferry.errors import ConfigError, MachineStateError, MigrationError
from vmferry.host_commands import HostCommands
from vmferry.machine.machine import Machine
from vmferry.migration import postcopy_commands as commands
from vmferry.migration import report, tls
from vmferry.migration.destination import IncomingMigration, IncomingResult
from vmferry.migration.devices import blockers
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.migration.status import MigrationStatus
from vmferry.qmp import hmp
from vmferry.qmp.backend import QmpError

MS = MigrationStatus
# A migration in progress (QEMU's migration_is_running, post-copy included): another
# may not start, nor may a capability change under it.
ACTIVE = commands.RUNNING


class VmController(Arrival, HostCommands):
    def __init__(
        self,
        machine: Machine | None,
        *,
        emit: Emit | None = None,
        make_incoming: Callable[[str], IncomingMigration] | None = None,
    ) -> None:
        """``machine`` is None for ``--incoming defer``: the VM arrives by migrate-incoming,
        through ``make_incoming(uri)``."""
        self._machine = machine
        self.make_incoming = make_incoming
        # "" (none) | setup (waiting) | active | completed | failed
        self.incoming_status: MigrationStatus | str = ""
        self.incoming_error = ""
        self.incoming: IncomingMigration | None = None
        self.incoming_result: IncomingResult | None = None
        self.emit: Emit = emit or (lambda name, data: None)
        self.params = MigrationParameters()
        self.caps = MigrationCapabilities()
        self.migration: MigrationSource | None = None
        self.finished = threading.Event()
        self._arrived = threading.Event()
        self.outcome = ""  # guest-exit | migrated | quit
        self._lock = threading.Lock()

    @property
    def current_machine(self) -> Machine | None:
        return self._machine

    @property
    def machine(self) -> Machine:
        if self._machine is None:
            status = self._incoming_state()
            if status in commands.POSTCOPY:
                raise QmpError(
                    f"the VM runs here in post-copy ({status}) while its last pages arrive; "
                    "it is under this process's control once they have"
                )
            raise QmpError("the VM has not arrived yet: it waits for an incoming migration")
        return self._machine

    # ---- run state
    def run_state(self) -> str:
        """QEMU's RunState names."""
        mig = self.migration
        if self._machine is None:
            # In post-copy the guest already runs here (QEMU's destination: running).
            return "running" if self._incoming_state() in commands.POSTCOPY else "inmigrate"
        if self.machine.exit is not None:
            return "shutdown"
        if mig is not None and mig.stats.status in commands.POSTCOPY:
            # QEMU's too: stopped for the switch, postmigrate only once every page is sent.
            return "finish-migrate"
        if mig is not None and mig.released:
            return "postmigrate"
        if mig is not None and mig.stats.status == MS.DEVICE:
            return "finish-migrate"
        return "running" if self.machine.running else "paused"

    def query_status(self) -> dict[str, Any]:
        state = self.run_state()
        return {"running": state == "running", "status": state}

    def stop(self) -> None:
        _ = self.machine  # refuses while the VM has not arrived
        if self.run_state() == "running":
            self.machine.pause()
            self.emit("STOP", {})

    def cont(self) -> None:
        _ = self.machine
        state = self.run_state()
        mig = self.migration
        if state == "postmigrate" and mig is not None and mig.resumable:
            # Saved to a file: the file is a copy; the VM itself is still only here.
            mig.resume_here()
            self.emit("RESUME", {})
            return
        if state == "postmigrate":
            where = mig.uri if mig is not None else "the destination"
            raise QmpError(
                f"the VM was handed over to the migration destination ({where}) and runs "
                "there; running it here too would make two copies of it"
            )
        if mig is not None and (why := commands.cont_refusal(mig.stats.status)):
            raise QmpError(why)
        if state in ("shutdown", "finish-migrate"):
            raise QmpError(f"the VM cannot be resumed in state '{state}'")
        if state == "paused":
            self.machine.resume()
            self.emit("RESUME", {})

    def quit(self) -> None:
        self._finish("quit")

    def _finish(self, outcome: str) -> None:
        if not self.finished.is_set():
            self.outcome = outcome
            self.finished.set()

    # ---- migration
    def migrate(self, uri: str, detach: bool = True, resume: bool = False) -> None:
        if resume:
            self._resume_postcopy(uri)
            return
        with self._lock:
            if self.migration is not None and self.migration.stats.status in ACTIVE:
                raise QmpError("There's a migration process in progress")
            if self.migration is not None and self.migration.released:
                raise QmpError("the VM has already been migrated away")
            if self.machine.exit is not None:
                raise QmpError("the guest has ended; there is nothing to migrate")
            blocked = blockers(self.machine.devices)
            if blocked:
                raise QmpError("migration blocked: " + "; ".join(blocked))
            try:
                mig = MigrationSource(self.machine, uri, self.params, self.caps, on_event=self.emit)
            except ConfigError as e:
                raise QmpError(str(e)) from e
            self.migration = mig
            mig.start()
        threading.Thread(
            target=self._watch, args=(mig,), name="migration-watch", daemon=True
        ).start()

    # ---- post-copy (QEMU's migrate-start-postcopy, migrate-pause, migrate-recover and
    # migrate's resume); the engine refuses what only it can judge (MigrationError).
    def migrate_start_postcopy(self) -> None:
        mig = self.migration
        # The migration's own capabilities: they cannot change while it runs.
        caps = mig.caps if mig is not None and mig.stats.status in ACTIVE else self.caps
        why = commands.start_refusal(
            caps.postcopy_ram,
            None if mig is None else mig.stats.status,
            "" if mig is None else mig.uri.scheme,
        )
        if why is not None:
            raise QmpError(why)
        assert mig is not None  # no migration is refused above
        try:
            mig.request_postcopy()
        except MigrationError as e:
            raise QmpError(str(e)) from e

    def migrate_pause(self) -> None:
        """Cut the link of a migration in post-copy, here or on the destination: both sides
        go to postcopy-paused and wait for migrate-recover + migrate resume."""
        mig, inc = self.migration, self.incoming
        try:
            if mig is not None and mig.stats.status in commands.PAUSABLE:
                mig.pause_postcopy()
                return
            if inc is not None and inc.status in commands.PAUSABLE:
                inc.pause_postcopy()
                return
        except MigrationError as e:
            raise QmpError(f"migrate-pause: {e}") from e
        raise QmpError(commands.PAUSE_REFUSAL)

    def migrate_recover(self, uri: str) -> None:
        """Destination: listen on ``uri`` for the source's ``migrate`` resume."""
        inc = self.incoming
        why = commands.recover_refusal(None if inc is None else inc.status)
        if why is not None:
            raise QmpError(why)
        assert inc is not None  # nothing incoming is refused above
        try:
            inc.recover(uri)
        except (MigrationError, ConfigError) as e:
            raise QmpError(f"migrate-recover {uri}: {e}") from e

    def _resume_postcopy(self, uri: str) -> None:
        mig = self.migration
        why = commands.resume_refusal(None if mig is None else mig.stats.status)
        if why is not None:
            raise QmpError(why)
        assert mig is not None  # no migration is refused above
        try:
            mig.resume_postcopy(uri)
        except (MigrationError, ConfigError) as e:
            raise QmpError(f"migrate resume {uri}: {e}") from e

    def _watch(self, mig: MigrationSource) -> None:
        mig.wait()
        if mig.stats.status == MS.COMPLETED and mig.uri.scheme == "tcp":
            # The VM runs on the destination now: this process's part is over.
            self._finish("migrated")

    def attach(self, machine: Machine) -> None:
        """The VM booted here, after the controller (and its QMP socket) was set up."""
        if self._machine is not None:
            raise MachineStateError("this controller already has a VM")
        self._machine = machine

    def migrate_cancel(self) -> None:
        mig = self.migration
        if mig is not None and (why := commands.cancel_refusal(mig.stats.status)):
            raise QmpError(why)
        if mig is not None:
            mig.cancel()

    def end_migration(self, timeout_s: float = 5.0) -> None:
        """The process is ending (a signal, a deadline) with a migration under way: cancel
        it and let it roll back, so that the destination is told why, before the VM is
        closed under it (which would fail it with a KVM error)."""
        mig = self.migration
        if mig is not None and mig.stats.status in commands.POSTCOPY:
            return  # no rollback after the switch: the engine says what is lost
        if mig is not None and not mig.done.is_set() and not mig.released:
            mig.cancel("the source process is ending")
            mig.wait(timeout_s)

    def query_migrate(self) -> dict[str, Any]:
        if self.migration is None:
            status = self._incoming_state()
            if status:
                return self._query_incoming(status)
            return {}
            return {}
        # A snapshot: the migration's threads write the stats while this reads them.
        return report.query_migrate_dict(self.migration.snapshot())

    def x_query_migrate_report(self) -> dict[str, Any]:
        if self.migration is None:
            raise QmpError("no migration has been started")
        return report.report_dict(self.migration.snapshot(), self.params, self.caps)

    def migrate_set_parameters(self, params: dict[str, Any]) -> None:
        """All or nothing, as QEMU's: a refused value leaves every parameter as it was."""
        try:
            new = self.params.updated(params)
            if new.tls_creds and "tls-creds" in params:
                # Checked now, not when a migration starts: a directory stored unchecked
                # would fail every later migration. A VM still waiting to arrive is a
                # destination (the server's files); a running one is a source.
                tls.check_creds(new.tls_creds, server=self._machine is None)
        except ConfigError as e:
            raise QmpError(str(e)) from e
        self.params = new

    def query_migrate_parameters(self) -> dict[str, Any]:
        return self.params.to_qmp()

    def migrate_set_capabilities(self, caps: dict[str, bool]) -> None:
        if self.migration is not None and self.migration.stats.status in ACTIVE:
            raise QmpError("There's a migration process in progress")
        try:
            self.caps = self.caps.updated(caps)
        except ConfigError as e:
            raise QmpError(str(e)) from e

    def human_monitor_command(self, command_line: str, cpu_index: int | None = None) -> str:
        m = self._machine
        if cpu_index is not None and (m is None or cpu_index >= m.config.vcpus):
            raise QmpError("Parameter 'cpu-index' expects a CPU number")  # QEMU's words
        return hmp.run(
            command_line,
            query_status=self.query_status,
            query_migrate=self.query_migrate,
            actions={
                "migrate_start_postcopy": self.migrate_start_postcopy,
                "migrate_pause": self.migrate_pause,
                "migrate_recover": self.migrate_recover,
            },
        )

    def query_migrate_capabilities(self) -> dict[str, bool]:
        return self.caps.to_qmp()

    # ---- waiting
    def wait_for(self, timeout: float) -> str:
        """Wait up to ``timeout`` for the guest to end, the VM to be migrated away, or quit;
        returns which ("" if none yet)."""
        if self._machine is None:
            self._arrived.wait(timeout)
            return self.outcome if self.finished.is_set() else ""
        if not self.finished.is_set() and self.machine.wait(timeout) is not None:
            mig = self.migration
            if mig is not None and not mig.done.is_set():
                mig.wait()
            if not (mig is not None and mig.released):
                self._finish("guest-exit")
        return self.outcome if self.finished.is_set() else ""


__all__ = ["MachineStateError", "VmController"]
