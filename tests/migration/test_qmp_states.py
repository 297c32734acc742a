"""What a source's QMP says around the end of a migration: cont after a tcp hand-over is
refused naming it; a cancel is "cancelling" until the VM runs on, then "cancelled"."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.migration.live import (
    Destination,
    Events,
    Guest,
    Workload,
    assert_source_intact,
    reference_result,
    wait_until,
)
from vmferry.controller import VmController
from vmferry.qmp.backend import QmpError

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

WORKLOAD = Workload(wss="16M", seed=21, rounds=8, rate=64, memory=128 << 20)


@pytest.fixture
def guest() -> Iterator[Guest]:
    reference_result(WORKLOAD)
    g = Guest(WORKLOAD)
    try:
        yield g
    finally:
        g.close()


def test_cont_after_a_tcp_hand_over_is_refused_naming_it(guest: Guest) -> None:
    dest = Destination()
    try:
        controller = VmController(guest.machine)
        controller.migrate(dest.uri)
        mig = controller.migration
        assert mig is not None
        assert mig.wait(60), "the migration did not end"
        assert mig.stats.status == "completed", mig.stats.error
        wait_until(lambda: controller.run_state() == "postmigrate", 5, "postmigrate")
        with pytest.raises(QmpError, match=rf"destination \({dest.uri}\).*two copies"):
            controller.cont()
        assert controller.run_state() == "postmigrate"
        assert dest.finish()[1] == reference_result(WORKLOAD)
    finally:
        dest.close()


def test_cancel_is_cancelling_until_the_rollback_is_done(guest: Guest) -> None:
    dest = Destination()
    events = Events()
    try:
        controller = VmController(guest.machine, emit=events)
        controller.migrate(dest.uri)
        wait_until(
            lambda: controller.query_migrate()["status"] == "active", 30, "the migration to run"
        )
        controller.migrate_cancel()
        # Never "active" once migrate_cancel has returned.
        assert controller.query_migrate()["status"] in ("cancelling", "cancelled")
        mig = controller.migration
        assert mig is not None and mig.wait(30)
        assert controller.query_migrate()["status"] == "cancelled"
        statuses = events.statuses()
        assert statuses[-2:] == ["cancelling", "cancelled"], statuses
        assert_source_intact(guest)
    finally:
        dest.close()
