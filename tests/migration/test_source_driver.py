"""The source as the driver of its table: a real migration walks exactly the table's
path (the table decides, the driver only turns I/O into events), statuses are announced
once each in the table's order, and a cancel from another thread takes the table's
cancelling path."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.machine import Machine, MachineConfig
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.migration.source_machine import SourceEvent, SourceState
from vmferry.migration.status import MigrationStatus
from vmferry.testing.harness import InProcessDestination, migrate

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

St, Ev = SourceState, SourceEvent
MEMORY = 64 << 20
MEMTOUCH = "wss=4M pattern=random seed=11 rounds=48 rate=64"


@pytest.fixture
def guest() -> Iterator[Machine]:
    m = Machine.boot(
        MachineConfig(memory=MEMORY, vcpus=1, image="memtouch", cmdline=MEMTOUCH),
        serial=io.BytesIO(),
    )
    try:
        m.start()
        yield m
    finally:
        m.close()


def events_of(src: MigrationSource) -> list[SourceEvent]:
    return [e for _, e in src._walk.history]


def statuses(seen: list[tuple[str, dict[str, object]]]) -> list[object]:
    return [d["status"] for n, d in seen if n == "MIGRATION"]


def test_a_live_migration_walks_the_tables_path_and_announces_each_status_once(
    guest: Machine,
) -> None:
    seen: list[tuple[str, dict[str, object]]] = []
    run = migrate(guest, on_event=lambda n, d: seen.append((n, d)))
    try:
        assert run.completed, (run.stats.status, run.stats.error, run.error)
        ev = events_of(run.source)
        assert ev[:3] == [Ev.START, Ev.CONNECTED, Ev.ACCEPTED]
        assert set(ev[3:-5]) <= {Ev.ROUND_CONTINUE}
        # x-verify on (the default): the audit after the resume, then completed.
        end = [Ev.ROUND_SWITCHOVER, Ev.STREAM_ENDED, Ev.READY, Ev.RESUMED_UNAUDITED]
        assert ev[-5:] == [*end, Ev.AUDIT_PASSED]
        assert run.source._walk.state is St.COMPLETED
        # One dirty sync per round plus the stop-and-copy's.
        assert run.stats.dirty_sync_count == len(run.stats.rounds)
        assert statuses(seen) == ["setup", "active", "device", "completed"]
        assert [n for n, _ in seen if n in ("STOP", "RESUME")] == ["STOP"]
        assert run.source.released and not run.source.resumable
    finally:
        run.close()


def test_a_file_migration_ends_saved_and_cont_runs_it_here(guest: Machine, tmp_path: Path) -> None:
    src = MigrationSource(
        guest, f"file:{tmp_path / 'vm.save'}", MigrationParameters(), MigrationCapabilities()
    )
    src.start()
    assert src.wait(60)
    assert src.stats.status == MigrationStatus.COMPLETED, src.stats.error
    assert events_of(src)[-2:] == [Ev.ROUND_SWITCHOVER, Ev.STREAM_ENDED]
    assert src.resumable and src.released and guest.paused
    assert src.stats.downtime.total_ms == src.stats.downtime_ms > 0
    src.resume_here()
    assert src._walk.state is St.CONTINUED and not src.released and not guest.paused
    assert not src.resumable


def test_a_cancel_as_the_rounds_start_takes_the_cancelling_path(guest: Machine) -> None:
    seen: list[tuple[str, dict[str, object]]] = []
    sources: list[MigrationSource] = []

    def on_event(name: str, data: dict[str, object]) -> None:
        seen.append((name, data))
        if data.get("status") == "active":  # on the migration thread, between actions
            sources[0].cancel("the test cancels")
            sources[0].cancel("a second cancel changes nothing")

    with InProcessDestination() as dest:
        src = MigrationSource(
            guest, dest.uri, MigrationParameters(), MigrationCapabilities(), on_event=on_event
        )
        sources.append(src)
        src.start()
        assert src.wait(60)
    assert src.stats.status == MigrationStatus.CANCELLED
    assert src.stats.error == "the test cancels"
    assert statuses(seen) == ["setup", "active", "cancelling", "cancelled"]
    hist = src._walk.history
    assert hist[-3:] == (
        (St.PRECOPY, Ev.CANCEL),
        (St.CANCELLING, Ev.CANCEL),  # the second: said already
        (St.CANCELLING, Ev.HALTED),  # the round stopped before it began
    )
    assert guest.exit is None and not guest.paused and not guest.dirty_logging


def test_a_cancel_before_the_start_ends_it_at_once(guest: Machine) -> None:
    src = MigrationSource(guest, "tcp:127.0.0.1:9", MigrationParameters(), MigrationCapabilities())
    src.cancel()
    src.start()  # nothing to start: it was cancelled
    assert src.wait(0) and src.stats.status == MigrationStatus.CANCELLED
    assert src.stats.error == "cancelled by the user"
    assert not guest.paused
