"""The destination says what became of a source that went away: it cancelled, it gave up
(the guest ended), or it was killed without a word."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator

import pytest

from tests.migration import live
from tests.migration.live import (
    Destination,
    Guest,
    Workload,
    assert_source_intact,
    start_migration,
    wait_migration,
    wait_until,
)
from vmferry.migration.params import MigrationParameters
from vmferry.qmp.client import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

# At 4 MB/s round 0 of the ~20 MiB the guest holds takes about 5 s.
SLOW = MigrationParameters(max_bandwidth=4_000_000)


@pytest.fixture
def dest() -> Iterator[Destination]:
    d = Destination()
    try:
        yield d
    finally:
        d.close()


def test_guest_that_ends_mid_migration(dest: Destination) -> None:
    guest = Guest(Workload(wss="16M", seed=2, rounds=3, rate=32, memory=128 << 20))
    try:
        src = start_migration(guest, dest.uri, SLOW)
        wait_migration(src)
        assert src.stats.error == "the guest ended during the migration", src.stats.error
        derr = dest.failure()
        assert (
            str(derr) == "the source abandoned the migration: the guest ended during the migration"
        )
    finally:
        guest.close()


def test_cancel_mid_round(dest: Destination) -> None:
    """The source's ABRT reaches the destination before it hangs up; the VM runs on."""
    w = Workload(wss="16M", seed=4, rounds=40, rate=32, memory=128 << 20)
    guest = Guest(w)
    try:
        src = start_migration(guest, dest.uri, SLOW)
        wait_until(lambda: src.snapshot().status == "active", 30, "the migration to run")
        src.cancel()
        wait_migration(src)
        assert src.stats.status == "cancelled"
        assert str(dest.failure()) == "the source cancelled the migration (cancelled by the user)"
        assert_source_intact(guest)
    finally:
        guest.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_source_killed_mid_round(dest: Destination, sig: signal.Signals) -> None:
    """SIGKILL: the connection just ends. SIGTERM: the source cancels and says so first
    (not a KVM error from the VM closed under the migration)."""
    w = Workload(wss="16M", seed=6, rounds=40, rate=32, memory=128 << 20)
    with live.qmp_dir() as d:
        qmp_path = d / "src.qmp"
        proc = live.start_source_process(w, qmp_path)
        try:
            with QmpClient(str(qmp_path)) as qmp:
                # The guest has just booted: little RAM holds data yet, so round 0 is kept
                # long (and the migration from converging) by a narrower link than SLOW.
                qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1_000_000})
                qmp.execute("migrate", uri=dest.uri)
                wait_until(
                    lambda: qmp.execute("query-migrate").get("status") == "active",
                    30,
                    "the migration to run",
                )
            proc.p.send_signal(sig)
            derr = str(dest.failure())
        finally:
            proc.kill()
            proc.finish()
    if sig == signal.SIGTERM:
        assert derr == "the source cancelled the migration (the source process is ending)"
        return
    want = r"the source closed the connection during round 0 \(it stopped or was killed\): "
    assert re.match(want, derr), derr
    assert "\n" not in derr
