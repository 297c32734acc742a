"""``vmferry run`` refuses what it cannot do with one line and exit 125, before a guest
boots; a guest that dies, or a save that fails, is said so plainly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Completed, guest_image, start_vmferry, vmferry
from vmferry.memory.host_memory import HostMemory

pytestmark = [pytest.mark.kvm]
# memtouch running a few seconds (16 MiB per round at 20 MB/s): long enough to be saved,
# to hold a QMP socket, or to end during a slow migration.
BUSY = ["--", "wss=16M", "rate=20", "rounds=8", "seed=3"]
SLOW = ["--", "wss=16M", "rate=4", "rounds=3", "seed=3"]  # ~12 s, slower to dirty


def one_error_line(r: Completed, *needles: str) -> str:
    """Exit 125, stderr one line saying what was wrong, no traceback."""
    assert r.returncode == 125, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmferry: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if os.path.exists(path):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no QMP socket at {path}")


# ---- 5: a guest that triple-faults


@pytest.mark.parametrize("vcpus,which", [(1, 0), (2, 1)])
def test_a_triple_fault_is_reported_in_one_line(vcpus: int, which: int) -> None:
    r = vmferry("run", "fault", "--memory", "64M", "--vcpus", str(vcpus), "--", f"vcpu={which}")
    line = one_error_line(r, "triple-faulted", f"vCPU {which}", "SHUTDOWN")
    assert re.search(r"rip 0x[0-9a-f]+", line), line
    assert b"executes ud2" in r.stdout  # the guest ran up to the fault


# ---- 6: bad --serial and --qmp paths, refused before the guest boots


def test_serial_in_a_missing_directory_is_refused() -> None:
    r = vmferry("run", "memtouch", "--serial", "/nonexistent/dir/f", "--", "rounds=1")
    one_error_line(r, "--serial /nonexistent/dir/f", "does not exist")


def test_qmp_in_a_missing_directory_is_refused() -> None:
    r = vmferry("run", "memtouch", "--qmp", "unix:/nonexistent/dir/x.qmp", "--", "rounds=1")
    one_error_line(r, "/nonexistent/dir", "does not exist")
    assert r.stdout == b""  # the guest never started (memtouch prints a header first)


def test_qmp_naming_a_regular_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "notasocket"
    f.write_text("keep me")
    r = vmferry("run", "memtouch", "--qmp", f"unix:{f}", "--", "rounds=1")
    one_error_line(r, str(f), "not a socket")
    assert r.stdout == b""
    assert f.read_text() == "keep me"


@pytest.mark.slow
def test_qmp_socket_held_by_a_running_vm_is_refused(unix_socket_path: str) -> None:
    first = start_vmferry(
        "run", "memtouch", "--memory", "64M", "--qmp", f"unix:{unix_socket_path}", *BUSY
    )
    try:
        _wait_for_socket(unix_socket_path, first)
        r = vmferry(
            "run", "memtouch", "--memory", "64M", "--qmp", f"unix:{unix_socket_path}", *BUSY
        )
        one_error_line(r, unix_socket_path, "in use")
        assert r.stdout == b""
        assert first.poll() is None  # the first VM is untouched and keeps its socket
        assert os.path.exists(unix_socket_path)
    finally:
        first.kill()
        first.wait()


# ---- 7: SIGTERM


@pytest.mark.slow
def test_sigterm_removes_the_qmp_socket_and_says_so(unix_socket_path: str) -> None:
    proc = start_vmferry(
        "run", "memtouch", "--memory", "64M", "--qmp", f"unix:{unix_socket_path}", *BUSY
    )
    try:
        _wait_for_socket(unix_socket_path, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert b"terminated" in err and b"Traceback" not in err, err
    assert not os.path.lexists(unix_socket_path)


# ---- 8: --timeout


def test_timeout_bounds_the_wait_for_an_incoming_migration() -> None:
    r = vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--timeout", "1", timeout=60)
    assert r.returncode == 125, r.stderr
    assert "no VM arrived within 1.0 s" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_bad_timeout_is_refused(value: str) -> None:
    r = vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--timeout", value, timeout=30)
    one_error_line(r, f"--timeout {value}")


# ---- 9: sizes the host cannot back


def _beyond_host() -> str:
    """A size (MiB) just over what this host's RAM and swap could ever hold."""
    return f"{(HostMemory.read().total >> 20) // 2 * 2 + 2048}M"


def test_memory_beyond_the_host_is_refused_unless_overcommitted() -> None:
    size = _beyond_host()
    one_error_line(vmferry("run", "hello", "--memory", size), "--memory", "--overcommit")
    one_error_line(vmferry("run", "hello", "--memory", "1T"), "can never back")
    r = vmferry("run", "hello", "--memory", size, "--overcommit")
    assert r.returncode == 0, r.stderr  # sparse: hello touches a few pages of it


def test_prealloc_beyond_what_is_available_is_refused() -> None:
    r = vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--prealloc", "1T", timeout=30)
    one_error_line(r, "--prealloc", "can be allocated")
    assert "waiting for a migration" not in r.stderr


# ---- 10: options an incoming VM cannot take, and guest keys


@pytest.mark.parametrize(
    "extra,named",
    [
        (["--memory", "2G"], "--memory"),
        (["--vcpus", "2"], "--vcpus"),
        (["--device", "dmaengine"], "--device"),
        (["--memory", "2G", "--vcpus", "2"], "--memory or --vcpus"),
        (["--", "rounds=3"], "guest arguments"),
    ],
)
def test_incoming_refuses_options_that_the_stream_decides(extra: list[str], named: str) -> None:
    r = vmferry("run", "--incoming", "tcp:127.0.0.1:0", *extra, timeout=30)
    one_error_line(r, "--incoming takes no", named, "from the stream")


def test_unknown_guest_keys_are_refused() -> None:
    r = vmferry("run", "memtouch", "--memory", "64M", "--", "wss=16M", "roundz=3")
    one_error_line(r, "'roundz=3'", "memtouch has no key 'roundz'", "rounds")
    one_error_line(vmferry("run", "memtouch", "--", "rounds"), "KEY=VALUE")
    assert vmferry("run", "memtouch", "--memory", "64M", "--", "wss=16K rounds=2").returncode == 0


def test_an_elf_path_is_not_checked_for_keys(tmp_path: Path) -> None:
    r = vmferry("run", str(guest_image("memtouch")), "--memory", "64M", "--", "x=1 wss=16K")
    assert r.returncode == 0, r.stderr


# ---- 20: --version, --memory in MiB


def test_version() -> None:
    r = vmferry("--version")
    assert r.returncode == 0
    assert re.fullmatch(rb"vmferry \d+\.\d+\.\d+\n", r.stdout), r.stdout


def _ram_top(stdout: bytes) -> int:
    """The top of guest RAM from hello's "ram BASE +LEN" lines."""
    tops = [
        int(b, 16) + int(n, 16)
        for b, n in re.findall(rb"^ram ([0-9a-f]+) \+([0-9a-f]+)$", stdout, re.MULTILINE)
    ]
    return max(tops)


@pytest.mark.parametrize("text,size", [("100", 100 << 20), ("1.5G", 3 << 29), ("64M", 64 << 20)])
def test_memory_is_in_mib_unless_it_says_otherwise(text: str, size: int) -> None:
    r = vmferry("run", "hello", "--memory", text)
    assert r.returncode == 0, r.stderr
    assert _ram_top(r.stdout) == size


# ---- 2: --save-after with a path it cannot write


@pytest.mark.parametrize("where", ["missing-dir", "directory", "unwritable"])
def test_save_after_refuses_a_bad_path_before_the_vm_runs(tmp_path: Path, where: str) -> None:
    path = {
        "missing-dir": tmp_path / "nodir" / "vm.state",
        "directory": tmp_path,
        "unwritable": Path("/proc/vm.state"),  # even root cannot create files there
    }[where]
    r = vmferry("run", "memtouch", "--memory", "64M", "--save-after", "1", str(path), *BUSY)
    one_error_line(r, f"--save-after {path}")
    assert r.stdout == b""  # refused before the guest started
    assert list(tmp_path.iterdir()) == []  # and nothing written (no PATH.partial)


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 1 MiB tmpfs: a save there runs out of space part-way."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.root
@pytest.mark.slow
def test_a_save_that_fails_resumes_the_vm_and_leaves_no_file(full_dir: Path) -> None:
    ref = vmferry("run", "memtouch", "--memory", "64M", *BUSY)
    assert ref.returncode == 0 and ref.result, ref.stderr
    path = full_dir / "vm.state"
    r = vmferry("run", "memtouch", "--memory", "64M", "--save-after", "0.5", str(path), *BUSY)
    assert r.returncode == 125, r.stderr
    assert "Traceback" not in r.stderr
    assert "No space left on device" in r.stderr and "resumed" in r.stderr, r.stderr
    assert f"not saved to {path}" in r.stderr.splitlines()[-1]
    assert r.result == ref.result  # it ran on to its normal end, memory intact
    assert list(full_dir.iterdir()) == []  # no vm.state, no vm.state.partial


# ---- QA: a destination's --timeout bounds only the wait for the VM to arrive


def _listening_port(dst: subprocess.Popen[bytes]) -> int:
    """The port a `run --incoming tcp:127.0.0.1:0` destination says it listens on."""
    assert dst.stderr is not None
    for _ in range(50):
        line = dst.stderr.readline().decode()
        if "waiting for a migration on" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError("the destination did not say where it listens")


@pytest.mark.slow
def test_destination_timeout_does_not_destroy_an_arrived_vm(unix_socket_path: str) -> None:
    # BUSY runs ~6 s; migrated at once, it runs on at the destination well past 2 s.
    dst = start_vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--timeout", "2")
    src = start_vmferry(
        "run", "memtouch", "--memory", "64M", "--qmp", f"unix:{unix_socket_path}", *BUSY
    )
    try:
        port = _listening_port(dst)
        _wait_for_socket(unix_socket_path, src)
        time.sleep(0.3)  # bound but maybe not yet listening
        mig = vmferry("migrate", "--qmp", unix_socket_path, f"tcp:127.0.0.1:{port}")
        assert mig.returncode == 0, mig.stderr
        out, err = dst.communicate(timeout=60)
    finally:
        dst.kill()
        src.kill()
    assert dst.returncode == 0, err
    assert b"did not finish" not in err, err
    ref = vmferry("run", "memtouch", "--memory", "64M", *BUSY)
    assert Completed(0, out, "").result == ref.result


@pytest.mark.slow
def test_destination_timeout_does_not_cut_a_migration_under_way(unix_socket_path: str) -> None:
    # At 4 MB/s the 16 MiB working set alone takes ~4 s, a second round more: past
    # --timeout 2, which bounds only the wait for a source to connect.
    src = start_vmferry(
        "run", "memtouch", "--memory", "64M", "--qmp", f"unix:{unix_socket_path}", *SLOW
    )
    dst: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_socket(unix_socket_path, src)
        time.sleep(0.3)  # bound but maybe not yet listening
        dst = start_vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--timeout", "2")
        port = _listening_port(dst)
        t0 = time.monotonic()
        mig = vmferry(
            "migrate", "--qmp", unix_socket_path, f"tcp:127.0.0.1:{port}",
            "--max-bandwidth", "4000000", "--downtime-limit", "2000",
        )  # fmt: skip
        took = time.monotonic() - t0
        assert mig.returncode == 0, mig.stderr
        out, err = dst.communicate(timeout=60)
    finally:
        if dst is not None:
            dst.kill()
        src.kill()
    assert took > 2.0, f"the migration took {took:.1f} s: not slow enough to test --timeout"
    assert dst.returncode == 0, err
    assert b"no VM arrived" not in err, err
    ref = vmferry("run", "memtouch", "--memory", "64M", *SLOW)
    assert Completed(0, out, "").result == ref.result


# ---- QA: --incoming file: naming something that is not a readable file


def test_incoming_file_naming_a_directory_is_one_line(tmp_path: Path) -> None:
    r = vmferry("run", "--incoming", f"file:{tmp_path}", timeout=30)
    one_error_line(r, f"--incoming file:{tmp_path}: is a directory")
    r = vmferry("run", "--incoming", "file:/proc/self/mem", timeout=30)  # opens, reads fail
    one_error_line(r, "--incoming file:/proc/self/mem: cannot read it: Input/output error")


def test_incoming_with_an_image_names_it_in_plain_words(tmp_path: Path) -> None:
    r = vmferry("run", "--incoming", f"file:{tmp_path}/x", "memtouch", timeout=30)
    one_error_line(r, "--incoming takes no guest image:")


# ---- QA: guest keys vmferry sets itself, and fault's vCPU


@pytest.mark.parametrize(
    "image,word,says",
    [
        ("memtouch", "vcpus=4", "vcpus= is set by vmferry from --vcpus"),
        ("hello", "vcpus=2", "vcpus= is set by vmferry from --vcpus"),
        ("memtouch", "tsc_khz=1000", "tsc_khz= is set by vmferry"),
    ],
)
def test_runtime_keys_vmferry_sets_are_refused(image: str, word: str, says: str) -> None:
    # Before: memtouch with vcpus=4 on a 1-vCPU VM waited for ever for the other three.
    r = vmferry("run", image, "--memory", "64M", "--", "wss=16M", "rounds=2", word, timeout=30)
    one_error_line(r, f"'{word}'", says)
    assert r.stdout == b""


@pytest.mark.parametrize("value,vcpus", [("abc", 1), ("-1", 2), ("2", 2), ("", 1)])
def test_fault_refuses_a_vcpu_the_vm_does_not_have(value: str, vcpus: int) -> None:
    r = vmferry("run", "fault", "--memory", "64M", "--vcpus", str(vcpus), "--", f"vcpu={value}")
    one_error_line(r, f"'vcpu={value}'", f"0 to {vcpus - 1}")
    assert r.stdout == b""


# ---- QA: small ones


def test_a_path_through_a_regular_file_is_not_a_directory(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    r = vmferry("run", "memtouch", "--memory", "64M", "--save-after", "1", f"{afile}/vm.state",
                *BUSY)  # fmt: skip
    one_error_line(r, f"--save-after {afile}/vm.state: {afile} is not a directory")
    r = vmferry("run", "memtouch", "--serial", f"{afile}/out", "--", "rounds=1")
    one_error_line(r, f"--serial {afile}/out: {afile} is not a directory")
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize(
    "argv,says",
    [
        (["run", "hello", "--memory", "4K"], "--memory 4K: must be at least 16 MiB"),
        (["run", "hello", "--memory", "17M"], "--memory 17M: must be at least 16 MiB"),
        (["run", "--incoming", "tcp:127.0.0.1:0", "--timeout", "inf"], "positive, finite"),
        (["run", "--incoming", "tcp:127.0.0.1:0", "--prealloc", "0"], "--prealloc 0: must be"),
        (["run", "--incoming", "tcp:127.0.0.1:0", "--prealloc", "4K"], "--prealloc 4K: must be"),
        (["run", "hello", "--qmp", "tcp:127.0.0.1:4444"], "a Unix socket: PATH or unix:PATH"),
    ],
)
def test_sizes_and_options_are_refused_in_the_users_words(argv: list[str], says: str) -> None:
    r = vmferry(*argv, timeout=30)
    one_error_line(r, says)
    assert "waiting for a migration" not in r.stderr


def test_run_qmp_takes_a_bare_path_as_migrate_does(unix_socket_path: str) -> None:
    r = vmferry("run", "hello", "--memory", "64M", "--qmp", unix_socket_path)
    assert r.returncode == 0, r.stderr
    assert b"hello" in r.stdout
    assert not os.path.lexists(unix_socket_path)  # opened, then removed at the end


@pytest.mark.slow
def test_a_serial_reader_that_goes_away_does_not_crash_the_guest() -> None:
    # As `vmferry run memtouch … | head -1`: memtouch prints a header, then its RESULT
    # line when it ends (~1.6 s later), into a pipe nobody reads any more.
    proc = start_vmferry(
        "run", "memtouch", "--memory", "64M", "--", "wss=16M", "rate=40", "rounds=4"
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"memtouch:")
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 0, err  # the guest ran to its normal end
    finally:
        proc.kill()
    assert err.splitlines() == [
        "vmferry: serial output stops here (its reader went away); the guest runs on"
    ], err
