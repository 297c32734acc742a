"""The rounds' decision (precopy): what the policy is shown at a round's end."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from vmferry.machine.machine import Machine
from vmferry.migration import policy
from vmferry.migration.figures import LiveFigures
from vmferry.migration.metrics import RoundRecord
from vmferry.migration.migratable import Pending
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.precopy import Parts, Precopy
from vmferry.migration.vcpus import VCPU_STATE_ESTIMATE, VcpuMigration

RAM_LEFT = 3 << 20
DEVICE_LEFT = 1 << 20
BANDWIDTH = 100e6  # bytes/s


def _precopy(ncpus: int) -> Precopy:
    machine = cast(Machine, SimpleNamespace(vcpus=[object()] * ncpus, throttle_pct=0))
    ram = SimpleNamespace(pending=lambda: Pending(RAM_LEFT))
    devices = SimpleNamespace(pending=lambda: Pending(DEVICE_LEFT), transferred=0)
    parts = Parts(cast(Any, ram), VcpuMigration(machine), cast(Any, devices), cast(Any, None))
    figures = LiveFigures(1 << 30)
    return Precopy(machine, parts, figures, MigrationParameters(), MigrationCapabilities())


def _round() -> RoundRecord:
    return RoundRecord(
        index=0, start_s=0.0, duration_s=1.0, pages=0, zero_pages=0, bytes=0,
        dirty_pages=0, dirty_rate=0.0, bandwidth=BANDWIDTH,
    )  # fmt: skip


def test_the_expected_downtime_counts_the_vcpus_state() -> None:
    """The stop-copy sends RAM, the devices' state and the vCPUs': all three are in the
    downtime the policy expects, and in the live figure."""
    pre = _precopy(ncpus=4)
    decision = pre._decide(_round(), sync_ms=0.0)
    vcpus = 4 * VCPU_STATE_ESTIMATE
    bw = policy.switchover_bandwidth([BANDWIDTH])
    want = policy.expected_downtime_ms(RAM_LEFT + DEVICE_LEFT + vcpus, bw)
    assert decision.expected_downtime_ms == want
    assert want > policy.expected_downtime_ms(RAM_LEFT + DEVICE_LEFT, bw)
    assert pre.figures.stats.expected_downtime_ms == want
    assert pre.figures._device_pending == DEVICE_LEFT + vcpus
