"""After a hand-over over tcp the source VM never runs again; cont says why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.migration.live import Destination, Guest, Workload, reference_result, wait_until
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
