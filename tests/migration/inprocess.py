"""A live migration between a source VM and a destination in this process: the harness
the device migration tests share."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

from tests.conftest import RESULT_RE
from vmferry.machine import Machine
from vmferry.migration.channel import parse_uri
from vmferry.migration.destination import IncomingMigration, IncomingResult
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource


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
    incoming = IncomingMigration(
        parse_uri("tcp:127.0.0.1:0"),
        serial=dest_out,
        announce=False,
        device_versions=versions,
        prealloc=prealloc,
    )
    got: dict[str, object] = {}

    def receive() -> None:
        try:
            got["r"] = incoming.receive()
        except BaseException as e:
            got["e"] = e

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    src = MigrationSource(
        m, f"tcp:127.0.0.1:{incoming.port}", MigrationParameters(), MigrationCapabilities()
    )
    src.start()
    assert src.wait(60)
    if src.stats.status != "completed" and not src.stats.rounds:
        incoming.close()  # the source never got far enough to connect (or was refused)
    t.join(60)
    assert not t.is_alive(), "the destination is still waiting"
    res, err = got.get("r"), got.get("e")
    return Outcome(
        src,
        source_out,
        m,
        res if isinstance(res, IncomingResult) else None,
        err if isinstance(err, BaseException) else None,
        dest_out,
    )
