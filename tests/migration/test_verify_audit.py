"""x-verify on|strict|off with a running memtouch guest: what each phase checks, and a
write the dirty tracking missed (injected after the last sync, through the VMM's own
mapping, on a page no device can reach) caught by the audit after resume — the
destination stops, the source runs the guest on to its reference RESULT."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tests.migration.live import (
    Guest,
    Workload,
    assert_source_intact,
    reference_result,
    result_in,
)
from vmferry.machine import Machine
from vmferry.migration import reception
from vmferry.migration.channel import PeerClosed
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.receiver_machine import ReceiverEvent
from vmferry.migration.reception import Reception
from vmferry.testing.harness import InProcessDestination, MigrationRun, migrate

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

WORKLOAD = Workload(wss="16M", seed=3, rounds=6, rate=64)  # about 1.5 s


class Injector:
    """Writes one page the guest never touched (it does not change the RESULT), behind
    the dirty log's back; remembers which."""

    def __init__(self) -> None:
        self.page: int | None = None

    def __call__(self, m: Machine) -> None:
        resident = np.zeros(m.memory.npages, dtype=bool)
        resident[m.memory.resident_pages()] = True
        holes = np.flatnonzero(~resident)
        self.page = int(holes[holes.size // 2])
        m.memory.pages()[self.page] = np.uint64(0x5AFE)


def _migrate(guest: Guest, verify: str, inject: Injector | None = None) -> MigrationRun:
    dest = InProcessDestination()
    return migrate(
        guest.machine,
        destination=dest,
        params=MigrationParameters(verify=verify),
        caps=MigrationCapabilities(),
        after_final_sync=inject,
    )


def _finish_on_destination(run: MigrationRun) -> None:
    """The guest ends at the destination with the reference RESULT (not at the source)."""
    assert run.result is not None, run.error
    ex = run.result.machine.wait(90)
    assert ex is not None and ex.code == 0, ex
    assert result_in(run.destination.serial.getvalue()) == reference_result(WORKLOAD)


def test_a_missed_write_is_caught_by_the_audit_and_the_guest_finishes_at_the_source() -> None:
    guest = Guest(WORKLOAD)
    inject = Injector()
    run: MigrationRun | None = None
    try:
        run = _migrate(guest, "on", inject)
        st = run.stats
        assert st.status == "failed", st.error
        assert st.error == f"verification failed after resume; rolled back: pages {inject.page}"
        assert run.result is None and "verification failed after resume" in str(run.error)
        v = st.verify
        assert v.phases["pre-resume"]["status"] == "passed"  # the page was not in it
        assert v.phases["audit"]["status"] == "failed"
        assert v.mismatched_pages == [inject.page]
        assert v.phases["audit"]["pages"] == guest.machine.memory.npages
        assert_source_intact(guest)  # runs here again, to the reference RESULT
    finally:
        if run is not None:
            run.close()
        guest.close()


def test_mode_on_checks_few_pages_before_resume_and_audits_all_after() -> None:
    guest = Guest(WORKLOAD)
    run: MigrationRun | None = None
    try:
        run = _migrate(guest, "on")
        st = run.stats
        assert st.status == "completed", st.error
        resident = guest.machine.memory.resident_pages().size
        pre, audit = st.verify.phases["pre-resume"], st.verify.phases["audit"]
        assert pre["status"] == audit["status"] == "passed"
        assert 0 < pre["pages"] < resident  # the final round only: no device here
        assert audit["pages"] == guest.machine.memory.npages and audit["source_ms"] > 0
        assert run.result is not None and run.result.verify.phases["audit"]["status"] == "passed"
        # passed once the audit passed, with its pages (both sides)
        assert st.verify.status == run.result.verify.status == "passed"
        assert st.verify.pages_checked == run.result.verify.pages_checked == audit["pages"]
        _finish_on_destination(run)
    finally:
        if run is not None:
            run.close()
        guest.close()


def test_mode_strict_checks_everything_before_resume_and_no_audit() -> None:
    guest = Guest(WORKLOAD)
    run: MigrationRun | None = None
    try:
        run = _migrate(guest, "strict")
        st = run.stats
        assert st.status == "completed", st.error
        assert set(st.verify.phases) == {"pre-resume"}
        assert st.verify.phases["pre-resume"]["pages"] == st.verify.pages_checked
        assert st.verify.pages_checked >= guest.machine.memory.resident_pages().size - 64
        _finish_on_destination(run)
    finally:
        if run is not None:
            run.close()
        guest.close()


def test_mode_off_checks_nothing_a_missed_write_goes_unseen() -> None:
    guest = Guest(WORKLOAD)
    inject = Injector()
    run: MigrationRun | None = None
    try:
        run = _migrate(guest, "off", inject)
        st = run.stats
        assert st.status == "completed", st.error
        assert st.verify.status == "off" and st.verify.phases == {}
        assert inject.page is not None
        _finish_on_destination(run)
    finally:
        if run is not None:
            run.close()
        guest.close()


def test_a_destination_lost_during_the_audit_leaves_the_vm_paused_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection breaks while the source waits for the audit's verdict: the source
    cannot know whether the VM runs there, so it keeps its copy paused (failed after the
    release); the destination, whose source is gone, runs the guest on unaudited."""

    def cut(r: Reception) -> ReceiverEvent:
        assert r.conn is not None
        r.conn.sock.shutdown(socket.SHUT_RDWR)
        raise PeerClosed("the test cut the connection during the audit")

    monkeypatch.setattr(reception, "await_audit", cut)
    guest = Guest(WORKLOAD)
    run: MigrationRun | None = None
    try:
        run = _migrate(guest, "on")
        st = run.stats
        assert st.status == "failed" and run.source.released
        assert st.error.endswith(
            "the VM stays paused here (postmigrate) because the destination may be running "
            "it or have stopped it there (it was lost during the audit after resume)"
        ), st.error
        assert guest.machine.paused and guest.machine.exit is None
        assert run.result is not None, run.error
        assert run.result.verify.phases["audit"]["status"] == "unfinished"
        assert st.verify.status == run.result.verify.status == "unaudited"
        _finish_on_destination(run)
    finally:
        if run is not None:
            run.close()
        guest.close()
