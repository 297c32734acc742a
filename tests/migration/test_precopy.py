"""The rounds' decision (precopy): what the policy is shown at a round's end."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from vmferry.devices.iommu import IovaMapping
from vmferry.machine.machine import Machine
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.migration import policy
from vmferry.migration.figures import LiveFigures
from vmferry.migration.metrics import RoundRecord
from vmferry.migration.migratable import Pending
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.precopy import Parts, Precopy, digest_ms_per_page
from vmferry.migration.vcpus import VCPU_STATE_ESTIMATE, VcpuMigration

RAM_LEFT = 3 << 20
DEVICE_LEFT = 1 << 20
BANDWIDTH = 100e6  # bytes/s


def _precopy(
    ncpus: int,
    memory: GuestMemory | None = None,
    verify: str = "off",
    devices: list[Any] | None = None,
) -> Precopy:
    machine = cast(
        Machine,
        SimpleNamespace(
            vcpus=[object()] * ncpus, throttle_pct=0, memory=memory, devices=devices or []
        ),
    )
    ram = SimpleNamespace(pending=lambda: Pending(RAM_LEFT))
    state = SimpleNamespace(pending=lambda: Pending(DEVICE_LEFT), transferred=0)
    parts = Parts(cast(Any, ram), VcpuMigration(machine), cast(Any, state), cast(Any, None))
    figures = LiveFigures(1 << 30)
    params = MigrationParameters(verify=verify)
    pre = Precopy(machine, parts, figures, params, MigrationCapabilities())
    pre._bandwidths.append(10 * BANDWIDTH)  # round 0 went by: the next round is one of dirty pages
    return pre


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
    bw = policy.switchover_bandwidth([10 * BANDWIDTH, BANDWIDTH], RAM_LEFT)
    assert bw == BANDWIDTH
    want = policy.PAUSE_RESUME_MS + policy.expected_downtime_ms(RAM_LEFT + DEVICE_LEFT + vcpus, bw)
    assert decision.expected_downtime_ms == pytest.approx(want)
    assert want > policy.PAUSE_RESUME_MS + policy.expected_downtime_ms(RAM_LEFT + DEVICE_LEFT, bw)
    assert pre.figures.stats.expected_downtime_ms == decision.expected_downtime_ms
    assert pre.figures._device_pending == DEVICE_LEFT + vcpus


def test_the_expected_downtime_counts_the_last_sync_and_the_fixed_cost() -> None:
    pre = _precopy(ncpus=1)
    slow = pre._decide(_round(), sync_ms=40.0)
    fast = _precopy(ncpus=1)._decide(_round(), sync_ms=0.0)
    assert slow.expected_downtime_ms == pytest.approx(fast.expected_downtime_ms + 40.0)
    assert slow.overhead_ms == pytest.approx(40.0 + policy.PAUSE_RESUME_MS)


def _memory() -> GuestMemory:
    mem = GuestMemory(8 << 20, name="test-precopy-verify")
    mem.view(0, 3 * PAGE_SIZE).cast("B")[:] = b"\x01" * (3 * PAGE_SIZE)
    mem.view(5 << 20, PAGE_SIZE).cast("B")[:] = b"\x02" * PAGE_SIZE
    return mem


def test_strict_verification_counts_every_resident_page() -> None:
    """x-verify strict digests every resident page before resume: that many pages at
    the digest cost measured on this memory are in the window; x-verify off adds none."""
    mem = _memory()
    try:
        resident = int(mem.resident_pages().size)
        assert resident >= 4
        checked = _precopy(ncpus=1, memory=mem, verify="strict")
        with_check = checked._decide(_round(), sync_ms=0.0)
        without = _precopy(ncpus=1, memory=mem, verify="off")._decide(_round(), sync_ms=0.0)
        cost = with_check.verify
        assert cost.pages == resident and not cost.pending and cost.ms_per_page > 0
        assert cost.setup_ms > 0  # finding the resident pages is timed too
        assert with_check.expected_downtime_ms == pytest.approx(
            without.expected_downtime_ms + resident * cost.ms_per_page + cost.setup_ms
        )
        assert without.verify == policy.NO_VERIFY
        # the pages are counted again at every decision; the costs are measured once
        mem.view(7 << 20, PAGE_SIZE).cast("B")[:] = b"\x03" * PAGE_SIZE
        again = checked._decide(_round(), sync_ms=0.0).verify
        assert again.pages == resident + 1
        assert (again.ms_per_page, again.setup_ms) == (cost.ms_per_page, cost.setup_ms)
    finally:
        mem.close()


def test_verification_on_counts_the_final_round_and_what_devices_reach() -> None:
    """x-verify on: the pending pages (the final round's) shrink with the rounds; the
    resident pages an IOMMU maps are checked whatever is pending (holes are not)."""
    mem = _memory()
    try:
        on = _precopy(ncpus=1, memory=mem, verify="on")._decide(_round(), sync_ms=0.0)
        assert on.verify.pages == 0 and on.verify.pending
        # no device reaches a page: the switchover does not look for resident pages
        assert on.verify.setup_ms == 0
        pending_pages = (RAM_LEFT + PAGE_SIZE - 1) // PAGE_SIZE
        off = _precopy(ncpus=1, memory=mem, verify="off")._decide(_round(), sync_ms=0.0)
        assert on.expected_downtime_ms == pytest.approx(
            off.expected_downtime_ms + pending_pages * on.verify.ms_per_page + on.verify.setup_ms
        )
        # a device maps pages 0-9 (0-2 hold data) and page 1280 (5 MiB, holds data)
        maps = [IovaMapping(0, 10 * PAGE_SIZE, 0), IovaMapping(1 << 30, PAGE_SIZE, 5 << 20)]
        iommu = SimpleNamespace(mappings=maps)
        dev = SimpleNamespace(iommu=iommu)
        with_dev = _precopy(ncpus=1, memory=mem, verify="on", devices=[dev])
        cost = with_dev._decide(_round(), sync_ms=0.0).verify
        assert cost.pages == 4 and cost.setup_ms > 0  # now the scan is in the window
    finally:
        mem.close()


def test_after_round_0_alone_nothing_is_measured_yet() -> None:
    """Round 0's bulk rate says nothing of the stop-and-copy's: with RAM pending the
    migration goes on to a round of dirty pages, and says why."""
    pre = _precopy(ncpus=1)
    pre._bandwidths.clear()
    d = pre._decide(_round(), sync_ms=0.0)
    assert d.action == "continue" and "no round of dirty pages measured yet" in d.reason
    assert d.expected_downtime_ms == float("inf")


def test_digest_calibration_measures_a_positive_cost() -> None:
    cost = digest_ms_per_page()
    assert 0 < cost < 1.0  # well under a millisecond a page on any host this runs on
