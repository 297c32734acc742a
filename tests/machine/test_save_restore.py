"""Save a running VM mid-run, restore it in a new process: the guest cannot tell."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from tests.conftest import RESULT_RE, guest_image, vmferry
from vmferry.machine import Machine, MachineConfig
from vmferry.migration.codec import VERSION
from vmferry.migration.snapshot import load_from_file, save_to_file

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

MEMTOUCH = "wss=128M pattern=random rounds=120"


def reference_result(vcpus: int, args: str) -> str:
    r = vmferry("run", "memtouch", "--memory", "512M", "--vcpus", str(vcpus), "--", args)
    assert r.returncode == 0, r.stderr
    assert r.result is not None
    return r.result


@pytest.mark.parametrize(
    ("vcpus", "seed", "save_after"), [(1, 7, 0.3), (2, 7, 0.6), (2, 11, 0.1), (1, 3, 0.9)]
)
def test_restored_run_prints_the_same_result(
    tmp_path: Path, vcpus: int, seed: int, save_after: float
) -> None:
    args = f"{MEMTOUCH} seed={seed}"
    state = tmp_path / "vm.state"
    saved = vmferry(
        "run",
        "memtouch",
        "--memory",
        "512M",
        "--vcpus",
        str(vcpus),
        "--save-after",
        str(save_after),
        str(state),
        "--",
        args,
    )
    assert saved.returncode == 0, saved.stderr
    assert saved.result is None, "the guest finished before it was saved"
    restored = vmferry("run", "--incoming", f"file:{state}")
    assert restored.returncode == 0, restored.stderr
    assert restored.result == reference_result(vcpus, args)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_cpustate_sees_no_register_change_across_save_and_restore(
    tmp_path: Path, vcpus: int
) -> None:
    state = tmp_path / "cpu.state"
    saved = vmferry(
        "run",
        "cpustate",
        "--memory",
        "64M",
        "--vcpus",
        str(vcpus),
        "--save-after",
        "0.5",
        str(state),
        "--",
        "park=3000000",
    )
    assert saved.returncode == 0, saved.stderr
    restored = vmferry("run", "--incoming", f"file:{state}")
    out = restored.stdout.decode()
    assert restored.returncode == 0, out + restored.stderr
    assert "CPUSTATE OK" in out and "CHANGED" not in out


def test_in_process_save_restore_keeps_cpu_state_bit_exact(tmp_path: Path) -> None:
    """The state read back from a restored vCPU equals the state that was saved."""
    config = MachineConfig(
        memory=128 << 20,
        vcpus=2,
        image=str(guest_image("memtouch")),
        cmdline="wss=32M rounds=100000 rate=50",
    )
    path = str(tmp_path / "m.state")
    with Machine.boot(config, serial=io.BytesIO()) as m:
        m.start()
        time.sleep(0.3)
        m.pause()
        saved = m.save_state()
        t_saved, khz = time.monotonic(), m.tsc_khz
        save_to_file(m, path)
    snap = load_from_file(path)
    with Machine.from_state(snap.state, snap.memory, serial=io.BytesIO()) as m2:
        m2.start(paused=True)
        m2.pause()
        again = m2.save_state()
        elapsed_s = time.monotonic() - t_saved
    for a, b in zip(saved.vcpus, again.vcpus, strict=True):
        assert a.regs == b.regs
        assert a.sregs == b.sregs
        assert a.xcrs == b.xcrs
        assert a.xsave[:576] == b.xsave[:576]  # legacy x87/SSE area and XSAVE header
        # FS/GS bases travel in sregs; these are the MSRs KVM lists for save/restore.
        essential = (0x277, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102)
        assert {k: a.msrs[k] for k in essential} == {k: b.msrs[k] for k in essential}
        # TSC continues from the saved value: it may run on by the time the restore took
        # (a loaded host), but not restart from 0 or jump to the host's.
        allowed = (elapsed_s + 0.1) * khz * 1000
        assert abs(b.msrs[0x10] - a.msrs[0x10]) < allowed


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "good.state"
    r = vmferry(
        "run",
        "memtouch",
        "--memory",
        "128M",
        "--save-after",
        "0.2",
        str(path),
        "--",
        "wss=16M rounds=100000",
    )
    assert r.returncode == 0, r.stderr
    return path


def _refused(path: Path) -> str:
    r = vmferry("run", "--incoming", f"file:{path}")
    assert r.returncode == 125, r.stderr
    assert not RESULT_RE.search(r.stdout) and r.stdout == b"", "the guest must not run"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_truncated_file_is_refused(saved_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.state"
    data = saved_file.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    assert "truncated" in _refused(bad) or "ends before" in _refused(bad)


def test_bit_flip_is_refused_naming_the_section(saved_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "flipped.state"
    data = bytearray(saved_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    msg = _refused(bad)
    assert "checksum mismatch" in msg and "section #" in msg


def test_wrong_magic_is_refused(saved_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "magic.state"
    bad.write_bytes(b"NOTAVMFY" + saved_file.read_bytes()[8:])
    assert "not a vmferry stream" in _refused(bad)


def test_newer_version_is_refused(saved_file: Path, tmp_path: Path) -> None:
    import struct

    import xxhash

    bad = tmp_path / "newer.state"
    data = saved_file.read_bytes()
    head = struct.pack("<8sII", data[:8], VERSION + 1, 0)
    bad.write_bytes(head + struct.pack("<Q", xxhash.xxh64_intdigest(head)) + data[24:])
    assert f"version {VERSION + 1} is newer than this vmferry's ({VERSION})" in _refused(bad)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert "cannot open saved state" in _refused(tmp_path / "nope.state")
