"""A source VM's QMP refuses bad migration input up front and keeps nothing of it: a
tls-creds that cannot be used, a file: URI in a missing directory; and cont after a
migration to a file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RESULT_RE, ROOT, vmferry
from vmferry.migration.tls import CLIENT_CERT
from vmferry.migration.tlscerts import make_creds
from vmferry.qmp.backend import QmpError
from vmferry.qmp.client import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.slow]
VMFERRY = [sys.executable, "-m", "vmferry.cli.main"]
GUEST = ["wss=16M", "seed=3", "rounds=24"]
PACED = [*GUEST, "rate=16"]  # about 25 s: it runs on while the test looks


def _client(path: str, proc: subprocess.Popen[bytes]) -> QmpClient:
    for _ in range(200):
        if Path(path).exists():
            try:
                return QmpClient(path)
            except ConnectionRefusedError:
                pass  # bound but not listening yet
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError(f"no QMP socket at {path}")


@pytest.fixture
def source() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A memtouch VM with a QMP socket, paced so that it runs for a while."""
    path = f"/tmp/vmferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.qmp"
    proc = subprocess.Popen(
        [*VMFERRY, "run", "memtouch", "--memory", "128M", "--qmp", f"unix:{path}", "--", *PACED],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _client(path, proc).close()
        yield path, proc
    finally:
        proc.kill()
        proc.wait(10)


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_refused_tls_creds_are_not_kept(
    source: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    path, _ = source
    bad = vmferry(
        "migrate", "--qmp", path, "tcp:127.0.0.1:1", "--tls-creds", "/nonexistent",
        "--downtime-limit", "123",
    )  # fmt: skip
    assert bad.returncode == 125, bad.stderr
    assert "/nonexistent is not a directory" in _one_line(bad.stderr)
    with QmpClient(path) as qmp:
        params = qmp.execute("query-migrate-parameters")
        # All or nothing: the downtime-limit of the same call was not applied either.
        assert (params["tls-creds"], params["downtime-limit"]) == ("", 300)
        # A source needs the client's pair: a destination's directory is refused.
        server_only = tmp_path / "server-only"
        make_creds(server_only, tmp_path / "ca", ["127.0.0.1"], "src")
        (server_only / CLIENT_CERT).unlink()
        with pytest.raises(QmpError, match=r"client-cert\.pem is missing"):
            qmp.execute("migrate-set-parameters", **{"tls-creds": str(server_only)})
        assert qmp.execute("query-migrate-parameters")["tls-creds"] == ""
        assert qmp.execute("query-status")["status"] == "running"
    # A later plain migration is not haunted by the refused directory.
    ok = vmferry("migrate", "--qmp", path, f"file:{tmp_path / 'vm.state'}")
    assert ok.returncode == 0, ok.stderr


def test_cont_after_a_migration_to_a_file(
    source: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """QEMU's postmigrate → running: the file is a copy, and the VM runs on here to the
    RESULT an unmigrated run gives; the file restores to it too."""
    path, proc = source
    state = tmp_path / "vm.state"
    mig = vmferry("migrate", "--qmp", path, f"file:{state}")
    assert mig.returncode == 0, mig.stderr
    with QmpClient(path) as qmp:
        assert qmp.execute("query-status")["status"] == "postmigrate"
        qmp.execute("cont")
        qmp.wait_event("RESUME", timeout=5)
        assert qmp.execute("query-status") == {
            "running": True,
            "status": "running",
            "singlestep": False,
        }
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    ref = vmferry("run", "memtouch", "--memory", "128M", "--", *GUEST)
    assert ref.result is not None, ref.stdout
    assert RESULT_RE.findall(out)[-1].decode() == ref.result
    restored = vmferry("run", "--incoming", f"file:{state}")
    assert restored.returncode == 0, restored.stderr
    assert restored.result == ref.result


def test_migrate_to_a_file_in_a_missing_directory_is_refused_up_front(
    source: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    path, _ = source
    with QmpClient(path) as qmp:
        with pytest.raises(QmpError, match="directory /nonexistent/dir does not exist"):
            qmp.execute("migrate", uri="file:/nonexistent/dir/x")
        with pytest.raises(QmpError, match="is a directory"):
            qmp.execute("migrate", uri=f"file:{tmp_path}")
        # Refused before anything started: no migration, the VM runs on untouched.
        assert qmp.execute("query-migrate") == {}
        assert qmp.execute("query-status")["status"] == "running"


def test_hold_output_without_the_audit_is_refused_at_migrate(
    source: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """x-verify-hold-output holds the destination's frames during the post-resume audit;
    with x-verify strict or off there is none: migrate refuses, in one line naming both,
    and the VM runs on here."""
    path, _ = source
    with QmpClient(path) as qmp:
        hold = [{"capability": "x-verify-hold-output", "state": True}]
        qmp.execute("migrate-set-capabilities", capabilities=hold)
        qmp.execute("migrate-set-parameters", **{"x-verify": "strict"})
        with pytest.raises(QmpError, match=r"x-verify-hold-output .*x-verify = strict"):
            qmp.execute("migrate", uri="tcp:127.0.0.1:1")
        assert qmp.execute("query-status")["status"] == "running"
    bad = vmferry("migrate", "--qmp", path, "tcp:127.0.0.1:1", "--verify", "off")
    assert bad.returncode == 125, bad.stderr
    line = _one_line(bad.stderr)
    assert "x-verify-hold-output" in line and "x-verify = off" in line
