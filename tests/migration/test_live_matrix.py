"""Live migration is invisible to the guest: over a matrix of workloads and migration
settings, the migrated guest prints the RESULT it prints when left alone, and the
switchover digests agree."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import vmferry
from tests.migration import live
from tests.migration.live import (
    Destination,
    Events,
    Guest,
    Workload,
    reference_result,
    start_migration,
    wait_migration,
)
from vmferry.machine import parse_size
from vmferry.migration.params import MigrationCapabilities, MigrationParameters

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@dataclass(frozen=True)
class Case:
    workload: Workload
    channels: int = 1
    compress: str = "none"
    max_bandwidth: int = 0
    downtime_limit_ms: int = 300
    min_rounds: int = 1  # pre-copy rounds the settings must lead to

    def params(self) -> MigrationParameters:
        return MigrationParameters(
            multifd_channels=self.channels,
            multifd_compression=self.compress,
            max_bandwidth=self.max_bandwidth,
            downtime_limit_ms=self.downtime_limit_ms,
        )

    def caps(self) -> MigrationCapabilities:
        return MigrationCapabilities(multifd=self.channels > 1)


# Each guest runs about 4 s (rate 0: 2-3 s, unpaced) and is migrated once it has filled its
# working set; a migration takes well under a second unless the case limits it.
CASES = {
    "16M-unpaced-1cpu": Case(Workload("16M", seed=1, rounds=1000, rate=0, vcpus=1)),
    "32M-seq-2ch": Case(Workload("32M", seed=2, rounds=8, rate=64, pattern="seq"), channels=2),
    "48M-4ch-zstd": Case(Workload("48M", seed=3, rounds=4, rate=48), channels=4, compress="zstd"),
    "128M": Case(Workload("128M", seed=4, rounds=4, rate=128)),
    "16M-unpaced-seq-3ch-zstd": Case(
        Workload("16M", seed=5, rounds=2000, rate=0, pattern="seq"), channels=3, compress="zstd"
    ),
    "48M-1cpu-limited-bw-many-rounds": Case(
        Workload("48M", seed=6, rounds=3, rate=32, vcpus=1),
        channels=2,
        compress="zstd",
        max_bandwidth=80_000_000,
        downtime_limit_ms=20,  # about 2 MB: what is dirty shrinks by 32/80 per round
        min_rounds=3,
    ),
    "32M-1cpu": Case(Workload("32M", seed=7, rounds=8, rate=64, vcpus=1)),
    "64M-seq-2ch": Case(Workload("64M", seed=8, rounds=6, rate=100, pattern="seq"), channels=2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_migrated_guest_prints_the_reference_result(case: Case) -> None:
    ref = reference_result(case.workload)
    guest = Guest(case.workload)
    dest = Destination()
    try:
        events = Events()
        src = start_migration(guest, dest.uri, case.params(), case.caps(), events)
        wait_migration(src)
        st = src.stats
        assert st.status == "completed", st.error
        assert events.statuses() == ["setup", "active", "device", "completed"]
        assert guest.machine.exit is None, "the guest ended before the migration did"
        incoming, result = dest.finish()
    finally:
        dest.close()
        guest.close()
    assert result == ref
    assert st.verify.status == "passed" and incoming.verify.status == "passed"
    assert incoming.verify.pages_checked == st.verify.pages_checked > 0
    precopy = [r for r in st.rounds if not r.stop_copy]
    assert len(precopy) >= case.min_rounds, st.rounds
    assert st.rounds[-1].stop_copy and len(st.rounds) == len(precopy) + 1
    assert incoming.rounds == len(st.rounds)  # both count the stop-and-copy round
    assert st.downtime_ms > 0 and st.transferred > 0


def auto_converge_params(switchover_timeout_ms: int, policy: str) -> MigrationParameters:
    """A link of 100 MB/s and a 20 ms downtime limit (about 2 MB may be left for the
    stop-and-copy): a guest rewriting 16-32 MiB faster than that never converges unless
    auto-converge throttles it (60 %, then 99 %)."""
    return MigrationParameters(
        max_bandwidth=100_000_000,
        downtime_limit_ms=20,
        cpu_throttle_initial=60,
        cpu_throttle_increment=39,
        switchover_timeout_ms=switchover_timeout_ms,
        switchover_policy=policy,
    )


def test_auto_converge_throttles_a_guest_that_outruns_the_link() -> None:
    w = Workload("16M", seed=9, rounds=1200, rate=0)  # unpaced: several GB/s
    ref = reference_result(w)
    guest = Guest(w)
    dest = Destination()
    # The timeout only guards against a hang; the assertions below need no force.
    params = auto_converge_params(15_000, "force")
    try:
        src = start_migration(guest, dest.uri, params, MigrationCapabilities(auto_converge=True))
        wait_migration(src)
        st = src.stats
        assert st.status == "completed", st.error
        assert guest.machine.throttle_pct == 0, "the throttle outlived the migration"
        _, result = dest.finish()
    finally:
        dest.close()
        guest.close()
    assert result == ref
    throttles = [r.throttle_pct for r in st.rounds if not r.stop_copy]
    assert throttles[0] == 0 and max(throttles) >= 60, st.rounds
    assert throttles == sorted(throttles), "the throttle only ever goes up"
    assert st.convergence.startswith("converged:"), st.convergence
    assert st.verify.status == "passed"


def test_auto_converge_throttles_a_paced_guest() -> None:
    w = Workload("32M", seed=13, rounds=40, rate=300)  # 300 MB/s, in 16-page steps
    guest = Guest(w)
    dest = Destination()
    try:
        src = start_migration(
            guest,
            dest.uri,
            auto_converge_params(3_000, "cancel"),
            MigrationCapabilities(auto_converge=True),
        )
        wait_migration(src)
        assert src.stats.status == "completed", src.stats.error
        assert max(r.throttle_pct for r in src.stats.rounds) >= 60
    finally:
        dest.close()
        guest.close()


def test_migration_to_a_file_continues_with_run_incoming(tmp_path: Path) -> None:
    w = Workload("32M", seed=10, rounds=6, rate=64)
    ref = reference_result(w)
    path = tmp_path / "vm.migration"
    guest = Guest(w)
    try:
        src = start_migration(guest, f"file:{path}")
        wait_migration(src)
        assert src.stats.status == "completed", src.stats.error
        # A file has no one to hand over to: the VM stays paused (postmigrate), for good.
        assert src.released and guest.machine.paused and guest.machine.exit is None
    finally:
        guest.close()
    r = vmferry("run", "--incoming", f"file:{path}", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.result == ref
    assert "verification passed" in r.stderr


# ---- through the command line, process to process


@dataclass(frozen=True)
class CliCase:
    workload: Workload
    flags: tuple[str, ...]
    verify: str


CLI_CASES = {
    "2ch-zstd": CliCase(
        Workload("32M", seed=11, rounds=5, rate=32),
        ("--channels", "2", "--compress", "zstd"),
        "passed",
    ),
    "1cpu-no-verify": CliCase(
        Workload("32M", seed=12, rounds=6, rate=64, vcpus=1, pattern="seq"),
        ("--no-verify", "--downtime-limit", "100"),
        "off",
    ),
}


@pytest.fixture
def qmp_dir() -> Iterator[Path]:
    with live.qmp_dir() as d:
        yield d


@pytest.mark.parametrize("case", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_migration_between_processes(case: CliCase, qmp_dir: Path) -> None:
    w = case.workload
    ref = reference_result(w)
    dest, port = live.start_destination_process()
    try:
        src = live.start_source_process(w, qmp_dir / "src.qmp")
        try:
            # Let the guest fill its working set (round 0 of memtouch) before it moves.
            time.sleep(parse_size(w.wss) / (w.rate * 1e6) + 0.2)
            report = qmp_dir / "report.json"
            mig = vmferry(
                "migrate",
                "--qmp",
                str(qmp_dir / "src.qmp"),
                f"tcp:127.0.0.1:{port}",
                *case.flags,
                "--report",
                str(report),
                timeout=60,
            )
            assert mig.returncode == 0, mig.stderr
        finally:
            s = src.finish(30)
    finally:
        d = dest.finish(60)
    assert s.returncode == 0, s.stderr
    assert f"vmferry: migrated to tcp:127.0.0.1:{port}" in s.stderr
    assert f"verification {case.verify}" in s.stderr
    assert s.result is None, "the source ran the guest to its end"
    assert d.returncode == 0, d.stderr
    assert d.result == ref
    assert f"verification {case.verify}); the VM runs here now" in d.stderr
    rep = json.loads(report.read_text())
    assert rep["status"] == "completed"
    assert rep["verify"]["status"] == case.verify
    assert rep["rounds"][-1]["stop-copy"] and not any(r["stop-copy"] for r in rep["rounds"][:-1])
