"""`vmferry migrate` refuses what it cannot do before it starts the migration (one line,
exit 125, the source VM untouched), and says what it knows, not a guess, when the source
goes away."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Completed, vmferry
from vmferry.cli.migrate import _write_atomically
from vmferry.errors import MigrationError
from vmferry.qmp.client import QmpClient

VMFERRY = [sys.executable, "-m", "vmferry.cli.main"]
PACED = ["wss=16M", "seed=3", "rate=8", "rounds=24"]  # about 50 s; killed when done with


def one_error_line(r: Completed, *needles: str) -> str:
    assert r.returncode == 125, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmferry: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def source() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A small paced memtouch VM with a QMP socket."""
    path = f"/tmp/vmferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.qmp"
    proc = subprocess.Popen(
        [*VMFERRY, "run", "memtouch", "--memory", "64M", "--qmp", f"unix:{path}", "--", *PACED],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if Path(path).exists():
                try:
                    QmpClient(path).close()
                    break
                except ConnectionRefusedError:
                    pass  # bound but not listening yet
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        yield path, proc
    finally:
        proc.kill()
        proc.wait(10)
        if os.path.lexists(path):
            os.unlink(path)


def _untouched(path: str) -> None:
    with QmpClient(path) as qmp:
        assert qmp.execute("query-migrate") == {}  # no migration was started
        assert qmp.execute("query-status")["status"] == "running"


@pytest.mark.kvm
@pytest.mark.slow
def test_bad_outputs_and_file_uris_are_refused_before_the_migration(
    source: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    path, _ = source
    out = str(tmp_path / "vm.state")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    cases = [
        (["--report", "/nonexistent/dir/r.json"], out, "directory /nonexistent/dir does not"),
        (["--report", str(tmp_path)], out, "is a directory"),
        (["--report", f"{a_file}/r.json"], out, f"{a_file} is not a directory"),
        (["--plot", str(tmp_path / "t.xyz")], out, "extension must name an image format"),
        (["--plot", str(tmp_path / "t")], out, "extension must name an image format"),
        ([], "file:/nonexistent/dir/x", "directory /nonexistent/dir does not exist"),
        ([], f"file:{tmp_path}", "is a directory"),
    ]
    for extra, uri, needle in cases:
        target = uri if uri.startswith("file:") else f"file:{uri}"
        r = vmferry("migrate", "--qmp", path, target, *extra, timeout=30)
        one_error_line(r, needle)
        assert r.stdout == b""  # no summary table: nothing ran
        _untouched(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.kvm
@pytest.mark.slow
def test_report_and_an_svg_plot_are_written(
    source: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    path, _ = source
    report, plot = tmp_path / "r.json", tmp_path / "t.svg"
    r = vmferry("migrate", "--qmp", path, f"file:{tmp_path / 'vm.state'}",
                "--report", str(report), "--plot", str(plot))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"migration completed" in r.stdout  # the summary is the result: on stdout
    assert report.read_text().startswith("{")
    assert plot.read_bytes().lstrip().startswith(b"<?xml")  # SVG, as its name says
    # Only the three files: the temporary ones were renamed into place.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.svg", "vm.state"]


def test_a_report_that_cannot_be_written_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "r.json"

    def fill_the_disk(tmp: str) -> None:
        Path(tmp).write_text('{"half": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(MigrationError) as e:
        _write_atomically(target, "the report", "completed", fill_the_disk)
    assert str(e.value) == (
        f"migration completed; cannot write the report to {target}: No space left on device"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_missing_socket_or_a_regular_file_is_cannot_connect(tmp_path: Path) -> None:
    missing = tmp_path / "none.qmp"
    r = vmferry("migrate", "--qmp", str(missing), "tcp:127.0.0.1:1", timeout=30)
    one_error_line(r, f"cannot connect to the QMP socket {missing}: No such file or directory")
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    r = vmferry("migrate", "--qmp", f"unix:{regular}", "tcp:127.0.0.1:1", timeout=30)
    line = one_error_line(r, f"cannot connect to the QMP socket {regular}: Connection refused")
    assert "did the guest" not in line
    assert regular.read_text() == "keep me"


@pytest.mark.kvm
@pytest.mark.slow
def test_sigterm_to_the_source_mid_migration_is_said_so(
    source: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    path, src = source
    # 1 MB/s: the 16 MiB the guest has touched take far longer than the test waits.
    mig = subprocess.Popen(
        [*VMFERRY, "migrate", "--qmp", path, f"file:{tmp_path / 'vm.state'}",
         "--max-bandwidth", "1000000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        with QmpClient(path) as qmp:
            while qmp.execute("query-migrate").get("status") != "active":
                assert time.monotonic() < deadline and mig.poll() is None
                time.sleep(0.05)
        time.sleep(0.5)
        src.send_signal(signal.SIGTERM)
        _, err = mig.communicate(timeout=30)
    finally:
        mig.kill()
    assert src.wait(30) == 128 + signal.SIGTERM
    assert mig.returncode == 125, err
    # The progress view (stderr) is left as it last stood; the last line says why it ended.
    line = err.decode().strip().splitlines()[-1]
    assert line.startswith("vmferry: error: lost the QMP connection"), line
    assert line.endswith("the source process was ended by a signal (SIGTERM or Ctrl-C)"), line
    assert b"Traceback" not in err
