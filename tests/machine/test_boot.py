"""Booting multiboot images on KVM: vCPUs, serial, debug exit, and clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.conftest import guest_image, vmferry
from vmferry.errors import GuestImageError, KvmUnavailable
from vmferry.machine import Machine, MachineConfig, run_to_exit

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_every_vcpu_runs_and_the_exit_code_comes_back(vcpus: int) -> None:
    out = io.BytesIO()
    config = MachineConfig(memory=64 << 20, vcpus=vcpus, image=str(guest_image("hello")))
    with Machine.boot(config, serial=out) as m:
        result = run_to_exit(m, timeout=30)
    assert result.code == 0 and result.qemu_status == 1
    text = out.getvalue().decode()
    for i in range(vcpus):
        assert f"hello from vcpu {i}" in text


def test_not_an_elf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "junk.elf"
    bad.write_bytes(b"\x7fELF" + b"\0" * 100)
    with pytest.raises(GuestImageError, match="multiboot header"):
        Machine.boot(MachineConfig(memory=64 << 20, image=str(bad)))


def test_missing_kvm_device_gives_one_line_explanation() -> None:
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Machine(MachineConfig(memory=64 << 20), kvm_device="/nonexistent/kvm")
    r = vmferry("run", "hello", "--kvm-device", "/nonexistent/kvm")
    assert r.returncode == 125
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "/nonexistent/kvm does not exist" in lines[0]


def test_bad_parameters_are_refused_by_the_cli() -> None:
    r = vmferry("run", "hello", "--vcpus", "9")
    assert r.returncode == 125 and "1 to 8 vCPUs" in r.stderr
    r = vmferry("run", "no-such-guest")
    assert r.returncode == 125 and "no built-in guest image 'no-such-guest'" in r.stderr
