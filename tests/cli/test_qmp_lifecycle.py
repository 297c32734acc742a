"""QMP over a VM's whole life: up while an incoming VM is awaited, and still up to report
a migration that failed because the guest ended."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import start_vmferry, vmferry
from vmferry.qmp.client import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


def _client(path: str, proc: subprocess.Popen[bytes]) -> QmpClient:
    for _ in range(200):
        if Path(path).exists():
            try:
                return QmpClient(path)
            except ConnectionRefusedError:
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no QMP socket at {path}")


def _listening_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stderr is not None
    for _ in range(50):
        line = proc.stderr.readline().decode()
        if "waiting for a migration on" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError("the destination did not say where it listens")


def test_qmp_answers_while_an_incoming_migration_is_awaited(unix_socket_path: str) -> None:
    dst = start_vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--qmp", f"unix:{unix_socket_path}")
    try:
        port = _listening_port(dst)
        with _client(unix_socket_path, dst) as qmp:
            assert qmp.execute("query-status")["status"] == "inmigrate"
            # No source yet: QEMU's destination says setup, and where it listens.
            assert qmp.execute("query-migrate") == {
                "status": "setup",
                "socket-address": [{"type": "inet", "host": "127.0.0.1", "port": str(port)}],
            }
            info = qmp.execute("human-monitor-command", **{"command-line": "info migrate"})
            assert info == (
                "Migration status: setup\r\ntotal time: 0 ms\r\n"
                f"socket address: [\r\n\ttcp:127.0.0.1:{port}\r\n]\r\n"
            )
            qmp.execute("quit")
        _, err = dst.communicate(timeout=30)
        assert dst.returncode == 0, err
        assert not os.path.lexists(unix_socket_path)
    finally:
        dst.kill()


def test_a_vm_arrives_at_an_incoming_vm_with_qmp(unix_socket_path: str) -> None:
    dst_qmp = unix_socket_path.replace(".qmp", "-dst.qmp")
    dst = start_vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--qmp", f"unix:{dst_qmp}")
    args = ["--", "wss=16M", "seed=9", "rate=50", "rounds=30"]
    src = start_vmferry(
        "run", "memtouch", "--memory", "128M", "--qmp", f"unix:{unix_socket_path}", *args
    )
    try:
        port = _listening_port(dst)
        _client(unix_socket_path, src).close()
        mig = vmferry("migrate", "--qmp", unix_socket_path, f"tcp:127.0.0.1:{port}")
        assert mig.returncode == 0, mig.stderr
        with _client(dst_qmp, dst) as qmp:
            assert qmp.execute("query-migrate")["status"] == "completed"
            assert qmp.execute("query-status")["status"] in ("running", "shutdown")
        out, err = dst.communicate(timeout=60)
        assert dst.returncode == 0, err
        assert b"migration received" in err
        ref = vmferry("run", "memtouch", "--memory", "128M", *args)
        assert ref.result is not None and ref.result.encode() in out
    finally:
        dst.kill()
        src.kill()


def test_a_guest_that_ends_mid_migration_is_reported_failed(unix_socket_path: str) -> None:
    dst = start_vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--timeout", "120")
    # The guest ends after a few seconds; at 4 MB/s the 128 MiB take half a minute.
    src = start_vmferry(
        "run", "memtouch", "--memory", "128M", "--qmp", f"unix:{unix_socket_path}",
        "--", "wss=16M", "rate=20", "rounds=4",
    )  # fmt: skip
    try:
        port = _listening_port(dst)
        _client(unix_socket_path, src).close()
        mig = vmferry(
            "migrate",
            "--qmp",
            unix_socket_path,
            "--max-bandwidth",
            "4000000",
            f"tcp:127.0.0.1:{port}",
        )
        assert mig.returncode == 125, mig.stderr
        assert "the guest ended during the migration" in mig.stderr, mig.stderr
        assert "did the guest finish or fail" not in mig.stderr
        _, err = src.communicate(timeout=30)
        assert src.returncode == 0, err  # the guest's own exit status
    finally:
        dst.kill()
        src.kill()


def test_sigterm_ends_the_wait_for_an_incoming_vm_cleanly(unix_socket_path: str) -> None:
    dst = start_vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--qmp", f"unix:{unix_socket_path}")
    try:
        _listening_port(dst)
        _client(unix_socket_path, dst).close()
        dst.send_signal(signal.SIGTERM)
        _, err = dst.communicate(timeout=30)
    finally:
        dst.kill()
    assert dst.returncode == 128 + signal.SIGTERM, err
    assert err.decode().strip().endswith("vmferry: terminated (SIGTERM)"), err
    assert b"Traceback" not in err
    assert not os.path.lexists(unix_socket_path)
