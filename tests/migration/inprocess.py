"""A live migration between a source VM and a destination in this process, as the device
migration tests see it (``vmferry.testing.harness`` underneath)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from tests.conftest import RESULT_RE
from vmferry.machine import Machine
from vmferry.migration.destination import IncomingResult
from vmferry.migration.source import MigrationSource
from vmferry.testing.harness import InProcessDestination, migrate


def result_of(out: io.BytesIO) -> str | None:
    found = RESULT_RE.findall(out.getvalue())
    return found[-1].decode() if found else None


@dataclass
class Outcome:
    source: MigrationSource
    source_out: io.BytesIO
    source_machine: Machine
    dest: IncomingResult | None
    dest_error: BaseException | None
    dest_out: io.BytesIO

    def result(self, out: io.BytesIO) -> str | None:
        return result_of(out)

    def finish(self) -> None:
        """Let whichever side runs the guest finish it, then close both."""
        try:
            if self.dest is not None:
                assert self.dest.machine.wait(60) is not None
                self.dest.machine.close()
            if self.source.stats.status != "completed":
                assert self.source_machine.wait(60) is not None
        finally:
            self.source_machine.close()


def migrate_running(
    m: Machine,
    source_out: io.BytesIO,
    *,
    versions: dict[str, int] | None = None,
    prealloc: int = 0,
) -> Outcome:
    """Migrate the started machine ``m`` to a destination on a thread, with defaults."""
    dest_out = io.BytesIO()
    dest = InProcessDestination(serial=dest_out, device_versions=versions, prealloc=prealloc)
    run = migrate(m, destination=dest)
    return Outcome(run.source, source_out, m, run.result, run.error, dest_out)
