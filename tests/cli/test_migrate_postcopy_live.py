"""`vmferry migrate --postcopy` between two `vmferry run` processes on KVM, as the
quick start shows it: postcopy-ram set on both sides (the destination through
--dest-qmp), migrate-start-postcopy after migrate, the switch when round 0 ends; the
destination prints the guest's reference RESULT and the report says what post-copy did."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RESULT_RE, start_vmferry, vmferry
from tests.migration.live import free_port
from tests.migration.postcopy.harness import uffd_unavailable
from vmferry.qmp import QmpError
from vmferry.qmp.client import QmpClient, QmpProtocolError

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(300),  # the CLI's own waits: 180 s, the destination's 120 s
    pytest.mark.skipif((why := uffd_unavailable()) is not None, reason=f"no uffd: {why}"),
]
# About 10 s of rewriting a 32 MiB working set (on a quiet host; the guest must outlast
# the migration on a loaded one, or it ends first and the migration fails, as it should):
# at the switch most of RAM is still owed.
GUEST = ["wss=32M", "seed=7", "rounds=20", "rate=64"]
# About 15 s: room for two rounds under a bandwidth cap before the switch.
LONGER = ["wss=32M", "seed=7", "rounds=30", "rate=64"]


def _socket() -> str:
    return f"/tmp/vmferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.qmp"


def _await_qmp(path: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        if Path(path).exists():
            try:
                QmpClient(path).close()
                return
            except ConnectionRefusedError:
                pass  # bound but not listening yet
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no QMP socket at {path}")


Pair = tuple[str, str, int, subprocess.Popen[bytes], subprocess.Popen[bytes]]


def _pair(guest: list[str]) -> Iterator[Pair]:
    src_qmp, dst_qmp, port = _socket(), _socket(), free_port()
    dst = start_vmferry("run", "--incoming", f"tcp:127.0.0.1:{port}", "--qmp", f"unix:{dst_qmp}")
    src = start_vmferry(
        "run", "memtouch", "--memory", "128M", "--qmp", f"unix:{src_qmp}", "--", *guest
    )
    try:
        _await_qmp(dst_qmp, dst)
        _await_qmp(src_qmp, src)
        yield src_qmp, dst_qmp, port, src, dst
    finally:
        for p in (src, dst):
            p.kill()
            p.wait(10)


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield from _pair(GUEST)


@pytest.fixture
def longer_pair() -> Iterator[Pair]:
    yield from _pair(LONGER)


def test_postcopy_through_the_cli_gives_the_reference_result(
    pair: Pair,
    tmp_path: Path,
) -> None:
    src_qmp, dst_qmp, port, src, dst = pair
    report = tmp_path / "report.json"
    watcher = QmpClient(src_qmp)  # the source's MIGRATION events, as a client sees them
    cli = start_vmferry(
        "migrate", "--qmp", src_qmp, f"tcp:127.0.0.1:{port}", "--postcopy",
        "--dest-qmp", dst_qmp, "--report", str(report),
    )  # fmt: skip
    statuses: list[str] = []
    during: dict[str, Any] = {}
    while not statuses or statuses[-1] not in ("completed", "failed", "cancelled"):
        try:
            statuses.append(watcher.wait_event("MIGRATION", timeout=30)["data"]["status"])
        except QmpProtocolError as e:
            raise AssertionError(f"{e} after {statuses}: {cli.communicate()}") from e
        if statuses[-1] == "postcopy-active":
            # The source says it from the switch, the destination from "go": both sides
            # once the guest runs there (the source has its "resumed": a downtime),
            # while pages still come (about a second).
            with QmpClient(dst_qmp) as d:
                deadline = time.monotonic() + 10
                while True:
                    during["dst"] = d.execute("query-migrate")
                    during["src"] = watcher.execute("query-migrate")
                    if during["dst"]["status"] != "active" and "downtime" in during["src"]:
                        break
                    assert time.monotonic() < deadline, f"it never resumed there: {during}"
                    time.sleep(0.01)
                during["src-run"] = watcher.execute("query-status")["status"]
                during["dst-run"] = d.execute("query-status")["status"]
    watcher.close()
    stdout, stderr = cli.communicate(timeout=180)
    assert cli.returncode == 0, stderr.decode()
    # QEMU 7.2's order, exactly: postcopy-active from the switch (no "device" between,
    # though the VM is paused for it) until the last page landed, then completed.
    assert statuses == ["setup", "active", "postcopy-active", "completed"], statuses
    # Asked right after the event: the last page is about a second away.
    assert during["src"]["status"] == during["dst"]["status"] == "postcopy-active", during
    assert "downtime" in during["src"] and "postcopy-blocktime" in during["src"], during
    assert (during["src-run"], during["dst-run"]) == ("finish-migrate", "running"), during
    rep = json.loads(report.read_text())
    assert rep["status"] == "completed" and rep["verify"]["status"] == "passed", rep
    assert rep["capabilities"]["postcopy-ram"] and rep["capabilities"]["postcopy-blocktime"]
    pc = rep["postcopy"]
    assert pc["active"] and pc["owed-pages"] > 0, pc
    # Every owed page came, once: by request or by the push.
    assert pc["urgent-pages"] + pc["pushed-pages"] == pc["owed-pages"], pc
    assert rep["ram"]["postcopy-bytes"] == pc["bytes"] > 0
    assert 0 < pc["switch-time"] < pc["complete-time"] <= rep["total-time"] / 1e3 + 0.5, pc
    out = stdout.decode()
    assert "post-copy: switched at" in out and "post-copy: request latency" in out, out
    dst_out, dst_err = dst.communicate(timeout=120)
    assert dst.returncode == 0, dst_err.decode()
    ref = vmferry("run", "memtouch", "--memory", "128M", "--", *GUEST)
    assert ref.result is not None
    assert RESULT_RE.findall(dst_out)[-1].decode() == ref.result
    src.wait(30)
    assert src.returncode == 0


def test_postcopy_after_two_rounds_switches_by_itself(longer_pair: Pair, tmp_path: Path) -> None:
    """--postcopy-after 2 under a cap the guest's rewriting outruns: pre-copy does not
    converge, so after round 2 the migration switches on its own and says why."""
    src_qmp, dst_qmp, port, _src, dst = longer_pair
    report = tmp_path / "report.json"
    r = vmferry(
        "migrate", "--qmp", src_qmp, f"tcp:127.0.0.1:{port}", "--postcopy-after", "2",
        "--max-bandwidth", "40M", "--dest-qmp", dst_qmp, "--report", str(report), timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert rep["parameters"]["x-postcopy-after"] == "2"
    assert rep["parameters"]["max-bandwidth"] == 40 << 20
    assert rep["convergence"] == (
        "switched to post-copy: not converged after 2 rounds (x-postcopy-after 2)"
    )
    assert rep["postcopy"]["active"] and rep["verify"]["status"] == "passed", rep
    dst_out, dst_err = dst.communicate(timeout=120)
    assert dst.returncode == 0, dst_err.decode()
    ref = vmferry("run", "memtouch", "--memory", "128M", "--", *LONGER)
    assert ref.result is not None
    assert RESULT_RE.findall(dst_out)[-1].decode() == ref.result


def test_post_copy_commands_on_a_real_source_refuse_in_qemus_words(tmp_path: Path) -> None:
    """On a running VM: each post-copy command refused where it cannot apply, in one line,
    and the VM untouched; after a completed migration (to a file) too."""
    path = _socket()
    vm = start_vmferry("run", "memtouch", "--memory", "64M", "--qmp", f"unix:{path}", "--",
                       "wss=16M", "seed=3", "rounds=24", "rate=16")  # fmt: skip
    try:
        _await_qmp(path, vm)
        with QmpClient(path) as qmp:
            refusals = {}
            for command, args in (
                ("migrate-start-postcopy", {}),
                ("migrate-pause", {}),
                ("migrate-recover", {"uri": "tcp:127.0.0.1:1"}),
                ("migrate", {"uri": "tcp:127.0.0.1:1", "resume": True}),
            ):
                with pytest.raises(QmpError) as e:
                    qmp.execute(command, **args)
                refusals[command] = e.value.desc
            assert refusals == {
                "migrate-start-postcopy": "Enable postcopy with migrate_set_capability "
                "before the start of migration",
                "migrate-pause": "migrate-pause is currently only supported during "
                "postcopy-active or postcopy-recover state",
                "migrate-recover": "Migrate recover can only be run when postcopy is paused. "
                "(now: no incoming migration)",
                "migrate": "Cannot resume if there is no paused migration (now: no migration)",
            }
            caps = [{"capability": "postcopy-ram", "state": True}]
            qmp.execute("migrate-set-capabilities", capabilities=caps)
            with pytest.raises(QmpError, match=r"^Postcopy must be started after migration"):
                qmp.execute("migrate-start-postcopy")
            assert qmp.execute("query-status")["status"] == "running"
            qmp.execute("migrate", uri=f"file:{tmp_path / 'vm.state'}")
            for _ in range(600):
                if qmp.execute("query-migrate")["status"] == "completed":
                    break
                time.sleep(0.05)
            with pytest.raises(QmpError) as e:
                qmp.execute("migrate-start-postcopy")
            assert e.value.desc == "migrate-start-postcopy: the migration has already completed"
            assert qmp.execute("query-status")["status"] == "postmigrate"
    finally:
        vm.kill()
        vm.wait(10)
