"""Post-copy end to end on KVM: memtouch migrated live with postcopy-ram, the switch asked
for during round 0; the destination runs on userfaultfd-registered RAM while its faults
are answered and the rest pushed; every page lands once, the audit after the last page
passes, and the guest prints the reference RESULT there."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.migration.live import (
    Guest,
    Workload,
    reference_result,
    result_in,
)
from tests.migration.postcopy.harness import uffd_unavailable
from vmferry.errors import MigrationError
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.postcopy import page_server
from vmferry.migration.source import MigrationSource
from vmferry.migration.status import MigrationStatus
from vmferry.migration.tls import server_for
from vmferry.migration.tlscerts import make_creds
from vmferry.testing.harness import InProcessDestination, MigrationRun, migrate

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(180),  # the harness bounds each side at 120 s, the guest at 90 s
    pytest.mark.skipif((why := uffd_unavailable()) is not None, reason=f"no uffd: {why}"),
]

# About 8 s of work over a 32 MiB working set it keeps rewriting (it outlasts round 0 on
# a loaded host): at the switch it owes the pages dirtied since round 0, and after the
# resume it touches them again.
WORKLOAD = Workload(wss="32M", seed=7, rounds=16, rate=64, memory=128 << 20)  # 2 vCPUs
ONE_VCPU = Workload(wss="24M", seed=3, rounds=16, rate=48, memory=64 << 20, vcpus=1)
TLS_WORKLOAD = Workload(wss="32M", seed=7, rounds=24, rate=64, memory=128 << 20)


# The background push's cap (until the source passes its own): the guest's touches must
# find owed pages still missing (a few thousand owed pages pushed uncapped took 0.2 s,
# before the guest touched one), and requests are not capped.
PUSH_CAP = 16 << 20


@pytest.fixture(autouse=True)
def _capped_push(monkeypatch: pytest.MonkeyPatch) -> None:
    real = page_server.PageServer.__init__

    def init(server: page_server.PageServer, *args: Any, **kw: Any) -> None:
        kw["max_bandwidth"] = kw.get("max_bandwidth") or PUSH_CAP
        real(server, *args, **kw)

    monkeypatch.setattr(page_server.PageServer, "__init__", init)


def _ask_for_postcopy(src: MigrationSource) -> None:
    """migrate-start-postcopy before round 0 ends (the source is in set-up): the switch
    ends round 0 whatever the policy says of it, so post-copy happens every time."""
    src.request_postcopy()


def _postcopy(
    guest: Guest, dest: InProcessDestination, verify: str = "on", channels: int = 1
) -> MigrationRun:
    return migrate(
        guest.machine,
        destination=dest,
        params=MigrationParameters(verify=verify, multifd_channels=max(channels, 2)),
        caps=MigrationCapabilities(postcopy_ram=True, multifd=channels > 1),
        during=_ask_for_postcopy,
    )


@pytest.mark.parametrize(
    ("workload", "channels"),
    # Two multifd channels on two cores: nothing pre-faults the destination's RAM, so
    # zero pages of pre-copy stay holes there (the fault server fills them).
    [(WORKLOAD, 1), (ONE_VCPU, 1), (WORKLOAD, 2)],
    ids=["2vcpu-seed7", "1vcpu-seed3", "2vcpu-seed7-2ch"],
)
def test_memtouch_switches_to_postcopy_after_round_0_and_gives_its_result(
    workload: Workload, channels: int
) -> None:
    dest = InProcessDestination()  # before the guest: its run is not spent on it
    guest = Guest(workload)
    run: MigrationRun | None = None
    try:
        t0 = time.monotonic()
        run = _postcopy(guest, dest, channels=channels)
        st = run.stats
        assert st.status == MigrationStatus.COMPLETED, st.error
        assert run.result is not None, run.error
        assert len(st.rounds) == 1, "the switch came at the end of round 0: no final round"
        pc = st.postcopy
        npages = guest.machine.memory.npages
        assert pc.active and 0 < pc.switch_s < pc.complete_s
        assert 0 < pc.owed_pages <= npages
        assert pc.urgent_pages + pc.pushed_pages == pc.owed_pages, "every owed page, once"
        assert pc.bytes == (pc.urgent_pages + pc.pushed_pages) * PAGE_SIZE
        assert pc.requests > 0 and pc.urgent_pages > 0, "the guest touched owed pages"
        here = run.result.postcopy
        assert here["landed_pages"] == here["filled_pages"] == pc.owed_pages, "each once"
        assert pc.latency_ms["p50"] <= pc.latency_ms["p99"] <= pc.latency_ms["max"]
        # The audit ran once the last page had landed, over all of RAM.
        audit = st.verify.phases["audit"]
        assert st.verify.status == "passed" and audit["status"] == "passed"
        assert audit["pages"] == npages
        assert run.result.verify.phases["audit"]["status"] == "passed"
        ex = run.result.machine.wait(90)
        assert ex is not None and ex.code == 0, ex
        assert result_in(run.destination.serial.getvalue()) == reference_result(workload)
        print(
            f"\npost-copy: owed {pc.owed_pages} pages, {pc.requests} requests "
            f"({pc.urgent_pages} urgent pages, {pc.pushed_pages} pushed); latency p50 "
            f"{pc.latency_ms['p50']:.2f} p99 {pc.latency_ms['p99']:.2f} max "
            f"{pc.latency_ms['max']:.2f} ms; blocktime {pc.blocktime_ms:.1f} ms; switch at "
            f"{pc.switch_s:.2f} s, last page at {pc.complete_s:.2f} s; downtime "
            f"{st.downtime_ms:.1f} ms (destination's preparation {here['prepare_ms']:.1f} ms, "
            f"{here['discard_runs']:.0f} runs discarded, {here['holes_at_switch']:.0f} holes, "
            f"{here['zero_filled']:.0f} zero-filled); took {time.monotonic() - t0:.2f} s"
        )
    finally:
        if run is not None:
            run.close()
        else:
            dest.close()
        guest.close()


def test_x_postcopy_after_switches_by_itself_and_without_verification_ends_at_the_last_page() -> (
    None
):
    dest = InProcessDestination()
    guest = Guest(WORKLOAD)
    run: MigrationRun | None = None
    try:
        run = migrate(
            guest.machine,
            destination=dest,
            # No downtime is small enough: round 0 never converges (the guest rewrites
            # its working set meanwhile), so x-postcopy-after 1 switches every time.
            params=MigrationParameters(verify="off", postcopy_after="1", downtime_limit_ms=0),
            caps=MigrationCapabilities(postcopy_ram=True),
        )
        st = run.stats
        assert st.status == MigrationStatus.COMPLETED, st.error
        assert run.result is not None, run.error
        assert len(st.rounds) == 1 and st.postcopy.active
        assert st.convergence.startswith("switched to post-copy: not converged after 1 round")
        assert st.verify.status == "off" and "audit" not in st.verify.phases
        assert run.result.postcopy["landed_pages"] == st.postcopy.owed_pages
        ex = run.result.machine.wait(90)
        assert ex is not None and ex.code == 0, ex
        assert result_in(run.destination.serial.getvalue()) == reference_result(WORKLOAD)
    finally:
        if run is not None:
            run.close()
        else:
            dest.close()
        guest.close()


class _WrongPage:
    """Serves one owed page wrong (the last one: holes and pages the destination holds
    are never served): the page server reads from a copy of the source's RAM with that
    page changed; the source's own RAM, which the audit digests, stays as it was."""

    def __init__(self) -> None:
        self.page = -1

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = page_server.PageServer.__init__

        def init(server: page_server.PageServer, ram: Any, *args: Any, **kw: Any) -> None:
            sent = kw["sent"]
            owed = np.setdiff1d(np.arange(sent.bitmap.npages), sent.bitmap.pages())
            self.page = page = int(owed[-1])
            wrong = np.array(ram, copy=True)
            wrong[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] ^= 0x5A
            real(server, wrong, *args, **kw)

        monkeypatch.setattr(page_server.PageServer, "__init__", init)


def test_a_page_served_wrong_is_caught_by_the_audit_and_the_source_keeps_its_vm_paused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guest ran at the destination since the switch (its DMA, its frames out): run
    here again from the switch its outside effects would come twice, so it stays paused."""
    dest = InProcessDestination()
    guest = Guest(WORKLOAD)
    wrong = _WrongPage()
    wrong.install(monkeypatch)
    run: MigrationRun | None = None
    try:
        run = _postcopy(guest, dest)
        st = run.stats
        assert st.status == MigrationStatus.FAILED, st.error
        assert st.error == (
            f"verification failed after post-copy: page {wrong.page} differs; the destination "
            "stopped the VM; the source keeps its paused copy from the switch, which has not "
            "run since"
        )
        assert run.result is None and "verification failed after post-copy" in str(run.error)
        assert st.verify.phases["audit"]["status"] == "failed"
        assert st.verify.mismatched_pages == [wrong.page]
        assert st.postcopy.active and st.postcopy.complete_s > 0  # caught after the last page
        m = guest.machine
        assert m.paused and m.exit is None, "the source ran its VM again after post-copy"
        assert run.source.released, "a VM that ran at the destination may not run here"
        with pytest.raises(MigrationError):
            run.source.resume_here()
        time.sleep(0.5)
        assert m.paused, "the source's VM was resumed after the failure"
    finally:
        if run is not None:
            run.close()
        else:
            dest.close()
        guest.close()


def test_postcopy_over_tls_opens_its_page_channels_secured(tmp_path: Path) -> None:
    """The page channels are opened before END but taken only after it: their TLS
    handshakes and hellos must not hold up the stream."""
    make_creds(tmp_path / "good", tmp_path / "ca", ["127.0.0.1", "localhost"], "source-a")
    dest = InProcessDestination(tls=server_for(str(tmp_path / "good"), "source-a"))
    guest = Guest(TLS_WORKLOAD)  # longer: round 0 encrypts in user space
    run: MigrationRun | None = None
    try:
        run = migrate(
            guest.machine,
            destination=dest,
            params=MigrationParameters(verify="on", tls_creds=str(tmp_path / "good")),
            caps=MigrationCapabilities(postcopy_ram=True),
            during=_ask_for_postcopy,
        )
        st = run.stats
        assert st.status == MigrationStatus.COMPLETED, st.error
        assert run.result is not None and st.postcopy.active
        assert st.verify.status == "passed"
        src_tls = run.source.tls
        assert src_tls is not None and len(src_tls.handshakes) == 3  # main, urgent, push
        ex = run.result.machine.wait(90)
        assert ex is not None and ex.code == 0, ex
        assert result_in(run.destination.serial.getvalue()) == reference_result(TLS_WORKLOAD)
    finally:
        if run is not None:
            run.close()
        else:
            dest.close()
        guest.close()
