"""dmatest with a dmaengine live-migrated in every DMA dirty-tracking mode; what broken
tracking, an incompatible destination, a blocker and a failing device arc do."""

from __future__ import annotations

import io
import time

import pytest

from tests.conftest import RESULT_RE
from tests.migration.inprocess import Outcome, migrate_running
from vmferry.machine import Machine, MachineConfig, run_to_exit

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

# ~2 s of device work at 20000 descriptors/s: the migration happens while DMA is running.
ARGS = "seed=3 rounds=600 rate=20000"
MEMORY = 128 << 20
_reference: dict[str, str] = {}


def config(device: str) -> MachineConfig:
    return MachineConfig(memory=MEMORY, image="dmatest", cmdline=ARGS, devices=(device,))


def reference() -> str:
    if "r" not in _reference:
        out = io.BytesIO()
        with Machine.boot(config("dmaengine"), serial=out) as m:
            assert run_to_exit(m, 60).code == 0
        found = RESULT_RE.findall(out.getvalue())
        _reference["r"] = found[-1].decode()
    return _reference["r"]


def migrate(
    device: str, *, versions: dict[str, int] | None = None, after_s: float = 0.4
) -> Outcome:
    src_out = io.BytesIO()
    m = Machine.boot(config(device), serial=src_out)
    m.start()
    assert m.wait(after_s) is None, "the guest ended before the migration"
    _wait_for_dma(m)
    return migrate_running(m, src_out, versions=versions)


def _wait_for_dma(m: Machine, descriptors: int = 200, timeout_s: float = 30.0) -> None:
    """Migrate only once the guest's DMA is under way: on a loaded host the guest may
    still be setting up after ``after_s``, and a migration that ends before the first
    descriptor has no DMA to track (broken tracking would then pass unnoticed)."""
    deadline = time.monotonic() + timeout_s
    while sum(getattr(d, "completed", 0) for d in m.devices) < descriptors:
        assert m.exit is None, "the guest ended before its DMA started"
        assert time.monotonic() < deadline, f"no {descriptors} DMA completions in {timeout_s} s"
        time.sleep(0.01)


def finish(o: Outcome) -> None:
    o.finish()


@pytest.mark.parametrize("mode", ["iommu", "device", "none"])
def test_every_tracking_mode_moves_the_vm_intact(mode: str) -> None:
    o = migrate(f"dmaengine,dirty={mode}")
    try:
        assert o.source.stats.status == "completed", o.source.stats.error
        assert o.source.stats.verify.status == "passed"
        assert o.dest is not None and o.dest.verify.status == "passed"
        assert o.source.stats.device_transferred > 0
        assert o.dest.machine.wait(60) is not None
        assert o.result(o.dest_out) == reference()
        assert o.result(o.source_out) is None, "the source ran the guest to its end too"
    finally:
        finish(o)


def test_a_device_logging_dma_in_2mib_pages_migrates_and_verifies() -> None:
    """The device chose a coarse DMA-log page: every write dirties its whole 2 MiB block,
    so more is re-sent than with 4 KiB pages, and nothing it wrote is missed."""
    o = migrate("dmaengine,dirty=device,x-dma-log-page=2M")
    try:
        assert o.source.stats.status == "completed", o.source.stats.error
        assert o.source.stats.verify.status == "passed"
        assert o.dest is not None and o.dest.verify.status == "passed"
        # (counted as pages new to the dirty set: KVM's log may have had some of a block)
        assert o.source.devices.stats[0].dma_dirty_pages > 0
        assert o.dest.machine.wait(60) is not None
        assert o.result(o.dest_out) == reference()
    finally:
        finish(o)


def test_untracked_dma_is_caught_by_verification_and_the_source_runs_on() -> None:
    o = migrate("dmaengine,dirty=broken")
    try:
        assert o.source.stats.status == "failed"
        assert "verification failed" in o.source.stats.error
        assert "pages" in o.source.stats.error
        # x-verify on: caught before resume (a device reaches every page: all are checked
        # then), not by the audit after it: the destination never ran the guest.
        assert o.source.stats.verify.mode == "on" and o.source.stats.verify.phase == "failed"
        assert "after resume" not in o.source.stats.error
        assert o.dest is None and "verification failed" in str(o.dest_error)
        assert o.source_machine.wait(60) is not None
        assert o.result(o.source_out) == reference()
    finally:
        finish(o)


def test_incompatible_destination_fails_at_setup_before_the_vm_stops() -> None:
    o = migrate("dmaengine", versions={"dmaengine": 2})
    try:
        st = o.source.stats
        assert st.status == "failed"
        assert "dmaengine version 2 here, 1 on the source" in st.error
        assert st.rounds == [] and st.downtime_ms == 0, "the VM was stopped or RAM moved"
        assert o.source_machine.wait(60) is not None
        assert o.result(o.source_out) == reference()
    finally:
        finish(o)


def test_a_blocker_stops_the_migration_before_anything_starts() -> None:
    o = migrate("dmaengine,x-migratable=off")
    try:
        assert o.source.stats.status == "failed"
        assert "migration blocked: dmaengine0 is marked not migratable" in o.source.stats.error
        assert o.source_machine.wait(60) is not None
        assert o.result(o.source_out) == reference()
    finally:
        finish(o)


@pytest.mark.parametrize(
    "arc",
    [
        "RUNNING>PRE_COPY",  # source, set-up
        "PRE_COPY>PRE_COPY_P2P",  # source, switchover: quiesce
        "PRE_COPY_P2P>STOP_COPY",  # source, switchover: stop
        "RUNNING_P2P>STOP",  # destination, entering RESUMING
        "STOP>RESUMING",  # destination
        "RESUMING>STOP",  # destination, commit
    ],
)
def test_a_device_arc_that_fails_leaves_the_source_running(arc: str) -> None:
    o = migrate(f"dmaengine,x-fail-arc={arc}")
    try:
        assert o.source.stats.status == "failed"
        assert "injected failure" in o.source.stats.error
        assert arc.replace(">", "→") in o.source.stats.error
        assert o.source_machine.wait(60) is not None
        assert o.result(o.source_out) == reference()
    finally:
        finish(o)


def test_a_device_that_cannot_return_to_running_is_reset_and_the_vm_runs_on() -> None:
    # STOP→RUNNING_P2P fails on the destination (before the hand-over) and again on the
    # source's way back from STOP_COPY: the source resets the device, as REFERENCE §3.6
    # says, and the VM keeps running (the guest then sees a reset device).
    o = migrate("dmaengine,x-fail-arc=STOP>RUNNING_P2P")
    try:
        assert o.source.stats.status == "failed"
        assert "injected failure on STOP→RUNNING_P2P" in o.source.stats.error
        assert o.source_machine.running
        assert [d.state.name for d in o.source_machine.devices] == ["RUNNING"]
    finally:
        o.source_machine.close()
