"""The in-process migration harness: it moves a small guest that then ends on the
destination as it would have unmigrated, and a destination that refuses, a cancel, a
time limit and a source that cannot start all come back as what they are, with nothing
left running."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import RESULT_RE
from vmferry.errors import VmferryError
from vmferry.machine import Machine, MachineConfig, run_to_exit
from vmferry.migration.params import MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.testing.harness import InProcessDestination, migrate

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

MEMORY = 64 << 20
# memtouch: rounds × wss / rate ≈ 3 s, long enough to be migrated while it runs.
MEMTOUCH = "wss=4M pattern=random seed=11 rounds=48"
PACING = " rate=64"
# dmatest: ~2 s of DMA at 20000 descriptors/s.
DMATEST = "seed=3 rounds=600 rate=20000"


def result_in(out: io.BytesIO) -> str | None:
    found = RESULT_RE.findall(out.getvalue())
    return found[-1].decode() if found else None


def memtouch(*, paced: bool = True) -> MachineConfig:
    return MachineConfig(
        memory=MEMORY, vcpus=1, image="memtouch", cmdline=MEMTOUCH + (PACING if paced else "")
    )


@pytest.fixture
def guest() -> Iterator[tuple[Machine, io.BytesIO]]:
    out = io.BytesIO()
    m = Machine.boot(memtouch(), serial=out)
    try:
        m.start()
        yield m, out
    finally:
        m.close()


def assert_runs_on(m: Machine) -> None:
    assert m.exit is None, f"the source guest ended ({m.exit})"
    assert not m.paused, "the source VM was left paused"
    assert not m.dirty_logging, "the source VM was left with the dirty log on"


def test_a_small_guest_migrates_and_ends_on_the_destination(
    guest: tuple[Machine, io.BytesIO],
) -> None:
    reference = io.BytesIO()
    with Machine.boot(memtouch(paced=False), serial=reference) as m:
        assert run_to_exit(m, 60).code == 0
    entered: list[str] = []

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        entered.append(threading.current_thread().name)
        yield

    m, source_out = guest
    dest = InProcessDestination(scope=scope, thread_name="the-destination")
    run = migrate(m, destination=dest)
    try:
        assert run.completed, (run.stats.status, run.stats.error, run.error)
        assert run.error is None and run.result is not None
        assert run.result.verify.status == "passed"
        assert 0 < run.source_s <= run.wall_s
        ex = run.result.machine.wait(60)
        assert ex is not None and ex.code == 0, ex
        assert result_in(run.destination.serial) == result_in(reference) is not None
        assert result_in(source_out) is None, "the source ran the guest to its end too"
        assert entered == [threading.current_thread().name, "the-destination"]
        assert not dest.waiting()
    finally:
        run.close()


def test_a_destination_that_refuses_the_vm_is_an_error_and_the_source_runs_on() -> None:
    out = io.BytesIO()
    config = MachineConfig(memory=MEMORY, image="dmatest", cmdline=DMATEST, devices=("dmaengine",))
    with Machine.boot(config, serial=out) as m:
        m.start()
        run = migrate(m, destination=InProcessDestination(device_versions={"dmaengine": 2}))
        assert run.stats.status == "failed" and not run.completed
        assert run.result is None
        assert isinstance(run.error, VmferryError), run.error
        assert "dmaengine version 2 here, 1 on the source" in str(run.error)
        assert_runs_on(m)
        assert not run.destination.waiting()


def test_a_cancel_during_the_migration_fails_the_destination(
    guest: tuple[Machine, io.BytesIO],
) -> None:
    m, _ = guest
    slow = MigrationParameters(max_bandwidth=8_000_000)  # round 0 takes seconds

    def cancel_once_active(src: MigrationSource) -> None:
        while src.stats.status == "setup":
            src.wait(0.01)
        src.cancel("the test cancels")

    run = migrate(m, params=slow, during=cancel_once_active)
    assert run.stats.status == "cancelled", run.stats.error
    assert run.result is None and run.error is not None
    assert "the test cancels" in str(run.error)
    assert_runs_on(m)


def test_a_migration_past_its_time_limit_is_cancelled_and_closed(
    guest: tuple[Machine, io.BytesIO],
) -> None:
    m, _ = guest
    dest = InProcessDestination()
    slow = MigrationParameters(max_bandwidth=1_000_000)
    with pytest.raises(TimeoutError, match=r"did not end within 0\.5 s"):
        migrate(m, destination=dest, params=slow, timeout_s=0.5)
    assert not dest.waiting(), "the destination was left receiving"
    assert_runs_on(m)


def test_a_source_that_cannot_start_closes_the_destination(
    guest: tuple[Machine, io.BytesIO],
) -> None:
    m, _ = guest
    dest = InProcessDestination()
    bad = MigrationParameters(tls_creds="/nonexistent/vmferry-creds")
    with pytest.raises(VmferryError):
        migrate(m, destination=dest, params=bad)
    assert not dest.waiting(), "the destination still waits for a source"
    assert dest.result is None
    assert_runs_on(m)
