"""A peer that goes silent (SIGSTOP, a link that drops every packet) is declared dead
within x-peer-timeout: the source rolls back and its VM runs on to the reference RESULT;
the destination gives up on a silent source and starts no guest."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import vmferry
from tests.migration import live
from tests.migration.live import (
    Destination,
    Events,
    Guest,
    Proc,
    Workload,
    assert_source_intact,
    reference_result,
    start_migration,
    wait_migration,
    wait_until,
)
from vmferry.migration.codec import Ready
from vmferry.migration.params import MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.migration.source_verify import SourceVerification
from vmferry.qmp.client import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

# About 10 s of guest: it must outlive a 2 s silence, the rollback and a slow round 0.
WORKLOAD = Workload(wss="32M", seed=11, rounds=20, rate=64)
PEER_TIMEOUT_MS = 2000
QUICK = MigrationParameters(peer_timeout_ms=PEER_TIMEOUT_MS)
# Round 0 (the working set) takes about 2 s at this rate: time to stop the peer in it.
SLOW = MigrationParameters(max_bandwidth=16_000_000, peer_timeout_ms=PEER_TIMEOUT_MS)
# Generous: a hung peer used to hold the source for minutes; the bound is 2 s.
BOUND_S = 30.0


@pytest.fixture
def guest() -> Iterator[Guest]:
    reference_result(WORKLOAD)
    g = Guest(WORKLOAD)
    try:
        yield g
    finally:
        g.close()


def failed_within_bound(src: MigrationSource) -> str:
    wait_migration(src, BOUND_S)
    assert src.stats.status == "failed", src.stats.error
    assert not src.released
    return src.stats.error


def stop(proc: Proc) -> None:
    proc.p.send_signal(signal.SIGSTOP)


def test_destination_stopped_during_precopy(guest: Guest) -> None:
    proc, port = live.start_destination_process()
    try:
        src = start_migration(guest, f"tcp:127.0.0.1:{port}", SLOW)
        wait_until(lambda: src.stats.status == "active", 10, "the first round")
        time.sleep(0.3)
        assert not src.stats.rounds, "round 0 ended too soon"
        stop(proc)
        err = failed_within_bound(src)
    finally:
        proc.kill()
    assert err == "the destination stopped answering for 2.0 s during round 0"
    assert_source_intact(guest)


def test_destination_stopped_during_switchover(guest: Guest) -> None:
    """SIGSTOP the destination the moment the source pauses the VM for the last pages: the
    source resumes the VM within the bound, not after minutes in finish-migrate."""
    proc, port = live.start_destination_process()

    def stop_at_switchover(name: str, data: dict[str, Any]) -> None:
        if data.get("status") == "device":
            stop(proc)

    events = Events(hook=stop_at_switchover)
    try:
        err = failed_within_bound(
            start_migration(guest, f"tcp:127.0.0.1:{port}", QUICK, events=events)
        )
    finally:
        proc.kill()
    assert "device" in events.statuses()
    assert [n for n, _ in events.seen if n in ("STOP", "RESUME")] == ["STOP", "RESUME"]
    assert err == "the destination stopped answering for 2.0 s during the switchover"
    assert_source_intact(guest)


def test_stopped_source_is_given_up_and_resumes_on_its_own() -> None:
    """SIGSTOP the source process mid-round: the destination gives up after the bound and
    says why; the source, continued, finds its destination gone, rolls back (QMP shows
    `failed` with the reason, the VM runs) and its guest ends with the reference RESULT."""
    w = WORKLOAD
    ref = reference_result(w)
    dest = Destination()
    try:
        with live.qmp_dir() as d:
            qmp_path = d / "src.qmp"
            proc = live.start_source_process(w, qmp_path)
            try:
                # A bound below 100 ms is refused in one line, before anything starts.
                bad = vmferry(
                    "migrate", "--qmp", str(qmp_path), "--peer-timeout", "50", dest.uri, timeout=30
                )
                assert bad.returncode == 125, bad.stderr
                assert "x-peer-timeout" in bad.stderr.strip().splitlines()[-1], bad.stderr
                with QmpClient(str(qmp_path)) as qmp:
                    qmp.execute(
                        "migrate-set-parameters",
                        # The guest has just booted: little RAM holds data yet, so round 0
                        # is kept long by a narrower link than SLOW.
                        **{"max-bandwidth": 1_000_000, "x-peer-timeout": 2000},
                    )
                    qmp.execute("migrate", uri=dest.uri)
                    wait_until(
                        lambda: qmp.execute("query-migrate").get("status") != "setup",
                        10,
                        "the migration to start",
                    )
                    assert qmp.execute("query-migrate")["status"] == "active"
                stop(proc)
                try:
                    derr = dest.failure(BOUND_S)
                finally:
                    proc.p.send_signal(signal.SIGCONT)
                want = "the source sent nothing for 2.0 s: it stopped, or the link to it is down"
                assert str(derr) == want
                with QmpClient(str(qmp_path)) as qmp:
                    last: dict[str, Any] = {}

                    def noticed() -> bool:
                        last.update(qmp.execute("query-migrate"))
                        return last.get("status") == "failed"

                    try:
                        wait_until(noticed, BOUND_S, "the source to notice")
                    except AssertionError as e:
                        raise AssertionError(f"{e}; query-migrate says {last}") from None
                    info = qmp.execute("query-migrate")
                    assert info["error-desc"] == f"the destination refused the VM: {want}", info
                    assert qmp.execute("query-status")["status"] == "running"
            finally:
                res = proc.finish()
    finally:
        dest.close()
    assert res.returncode == 0, res.stderr
    assert res.result == ref


def test_destination_that_gave_up_waiting_for_go_leaves_the_vm_here(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source stalls between "ready" and "go" longer than the bound: the destination
    gives up (and says so) without starting the guest, and the source, once it goes on,
    keeps its VM: never none running."""
    real = SourceVerification.ready

    def stalled(self: SourceVerification, msg: Ready, pre_resume_ms: float) -> None:
        real(self, msg, pre_resume_ms)
        time.sleep(PEER_TIMEOUT_MS / 1e3 + 1.5)

    monkeypatch.setattr(SourceVerification, "ready", stalled)
    dest = Destination()
    try:
        events = Events()
        err = failed_within_bound(start_migration(guest, dest.uri, QUICK, events=events))
        derr = dest.failure(BOUND_S)
    finally:
        dest.close()
    assert str(derr) == 'no "go" from the source within 2 s'
    assert err == f"the destination refused the VM: {derr}"
    assert [n for n, _ in events.seen if n in ("STOP", "RESUME")] == ["STOP", "RESUME"]
    assert_source_intact(guest)


# ---- a link that drops every packet


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def veth_pair() -> Iterator[tuple[str, str, str, str]]:
    """A network namespace joined to this one by a veth pair: (netns, this side's device,
    that side's device, that side's address)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (iproute2) is not installed: run 'make system-deps'")
    tag = os.getpid() % 100_000
    ns, here, there = f"vmferry-t{tag}", f"vmft{tag}a", f"vmft{tag}b"
    subnet = f"10.213.{tag % 250}"
    try:
        _sh("ip", "netns", "add", ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace: {e.stderr.decode().strip()}")
    try:
        _sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _sh("ip", "link", "set", there, "netns", ns)
        _sh("ip", "addr", "add", f"{subnet}.1/30", "dev", here)
        _sh("ip", "link", "set", here, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{subnet}.2/30", "dev", there)
        _sh("ip", "-n", ns, "link", "set", there, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, here, there, f"{subnet}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def drop_everything(dev: str, netns: str | None = None) -> None:
    # A token bucket smaller than any packet drops every packet (netem is not in every
    # kernel, nor are tc's classifiers; tbf is).
    where = ("ip", "netns", "exec", netns) if netns else ()
    tbf = ("tbf", "rate", "1kbit", "burst", "10", "limit", "10")
    _sh(*where, "tc", "qdisc", "replace", "dev", dev, "root", *tbf)


@pytest.mark.root
def test_link_that_drops_every_packet(guest: Guest) -> None:
    """Mid round 0 the link starts dropping every packet, both ways (no RST, no FIN: only
    silence): the source rolls back within the bound; the destination gives up too."""
    with veth_pair() as (ns, here, there, addr):
        proc = Proc("run", "--incoming", f"tcp:{addr}:0", prefix=("ip", "netns", "exec", ns))
        try:
            port = int(proc.wait_stderr(r"waiting for a migration on [\d.]+:(\d+)").group(1))
            src = start_migration(guest, f"tcp:{addr}:{port}", SLOW)
            wait_until(lambda: src.stats.status == "active", 10, "the first round")
            time.sleep(0.3)
            assert not src.stats.rounds, "round 0 ended too soon"
            drop_everything(here)
            drop_everything(there, ns)
            err = failed_within_bound(src)
            dres = proc.finish(BOUND_S)
        finally:
            proc.kill()
    assert err == "the destination stopped answering for 2.0 s during round 0"
    assert dres.returncode == 125, dres.stderr
    assert "the source sent nothing for 2.0 s" in dres.stderr, dres.stderr
    assert dres.result is None
    assert_source_intact(guest)
