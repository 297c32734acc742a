"""QMP on a real running VM: run state, events, quit, and migrate-incoming (defer)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import RESULT_RE, ROOT, vmferry
from vmferry.qmp.backend import QmpError
from vmferry.qmp.client import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.slow]
VMFERRY = [sys.executable, "-m", "vmferry.cli.main"]


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*VMFERRY, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _client(path: str, proc: subprocess.Popen[bytes]) -> QmpClient:
    for _ in range(100):
        if Path(path).exists():
            try:
                return QmpClient(path)
            except ConnectionRefusedError:
                pass  # bound but not listening yet
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError(f"no QMP socket at {path}")


@pytest.fixture
def qmp_path(tmp_path: Path) -> str:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return f"/tmp/vmferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.qmp"


def test_stop_cont_quit_with_events(qmp_path: str) -> None:
    proc = _start(
        "run",
        "memtouch",
        "--memory",
        "128M",
        "--qmp",
        f"unix:{qmp_path}",
        "--",
        "wss=16M",
        "rate=20",
        "rounds=100000",
    )
    try:
        with _client(qmp_path, proc) as qmp:
            assert qmp.execute("query-status")["status"] == "running"
            qmp.execute("stop")
            qmp.wait_event("STOP", timeout=5)
            assert qmp.execute("query-status") == {
                "running": False,
                "status": "paused",
                "singlestep": False,
            }
            qmp.execute("cont")
            qmp.wait_event("RESUME", timeout=5)
            assert qmp.execute("query-status")["running"] is True
            assert qmp.execute("query-migrate") == {}
            with pytest.raises(QmpError, match="migration URI"):
                qmp.execute("migrate", uri="udp:nowhere")
            qmp.execute("quit")
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_deferred_incoming_receives_a_live_migration(qmp_path: str) -> None:
    dst_qmp = qmp_path.replace(".qmp", "-dst.qmp")
    dst = _start("run", "--incoming", "defer", "--qmp", f"unix:{dst_qmp}")
    src = _start(
        "run",
        "memtouch",
        "--memory",
        "256M",
        "--qmp",
        f"unix:{qmp_path}",
        "--",
        "wss=32M",
        "seed=5",
        "rate=100",
        "rounds=20",
    )
    try:
        with _client(dst_qmp, dst) as qmp:
            assert qmp.execute("query-status")["status"] == "inmigrate"
            with pytest.raises(QmpError, match="has not arrived yet"):
                qmp.execute("stop")
            qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
        # The destination listens on a port chosen by the kernel; it says which.
        port = None
        assert dst.stderr is not None
        for _ in range(50):
            line = dst.stderr.readline().decode()
            if "waiting for a migration on" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert port, "the destination did not say where it listens"
        _client(qmp_path, src).close()
        mig = vmferry("migrate", "--qmp", qmp_path, f"tcp:127.0.0.1:{port}")
        assert mig.returncode == 0, mig.stderr
        assert src.wait(30) == 0
        out, _ = dst.communicate(timeout=60)
        assert dst.returncode == 0
        ref = vmferry("run", "memtouch", "--memory", "256M", "--", "wss=32M", "seed=5", "rounds=20")
        assert RESULT_RE.findall(out) == RESULT_RE.findall(ref.stdout)
    finally:
        dst.kill()
        src.kill()


def test_human_monitor_info_status_and_migrate(qmp_path: str) -> None:
    """`human-monitor-command` answers `info status` and `info migrate` as QEMU's monitor
    does, so `qmp-shell -H` works against a vmferry VM."""
    proc = _start(
        "run",
        "memtouch",
        "--memory",
        "128M",
        "--qmp",
        f"unix:{qmp_path}",
        "--",
        "wss=16M",
        "rate=20",
        "rounds=100000",
    )
    try:
        with _client(qmp_path, proc) as qmp:

            def hmp(line: str, **kw: int) -> str:
                return str(qmp.execute("human-monitor-command", **{"command-line": line, **kw}))

            assert hmp("info status") == "VM status: running\r\n"
            assert hmp("info migrate") == ""  # no migration yet
            qmp.execute("stop")
            assert hmp("info status", **{"cpu-index": 0}) == "VM status: paused\r\n"
            with pytest.raises(QmpError, match="expects a CPU number"):
                hmp("info status", **{"cpu-index": 1})  # one vCPU
            qmp.execute("cont")
            qmp.execute("migrate", uri="tcp:127.0.0.1:1")  # nobody listens there
            deadline = time.monotonic() + 10
            while qmp.execute("query-migrate")["status"] != "failed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            text = hmp("info migrate")
            assert text.startswith(
                "Migration status: failed (cannot connect to the destination "
                "tcp:127.0.0.1:1: Connection refused)\r\ntotal time: "
            ), text
            shell = subprocess.run(
                [str(Path(sys.executable).parent / "qmp-shell"), "-H", qmp_path],
                input=b"info status\n",
                capture_output=True,
                timeout=30,
            )
            assert b"VM status: running" in shell.stdout, shell
            qmp.execute("quit")
        assert proc.wait(10) == 0
    finally:
        proc.kill()
