"""The same guest image under QEMU and under vmferry: the same answer.

QEMU is the reference machine for the guest ABI (docs/guest-abi.md): if a guest's RESULT
differs between the two, one of them is wrong, and a vmferry-only test would not notice.
QEMU starts only vCPU 0 of a multiboot image, so vmferry runs with 1 vCPU here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, Completed, guest_image, vmferry

QEMU = "qemu-system-x86_64"
TIMEOUT_S = 30

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which(QEMU) is None,
        reason=f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86)",
    ),
]


def qemu(name: str, cmdline: str) -> Completed:
    """Boot ``guests/build/NAME.elf32`` (QEMU's multiboot loader takes ELF32 only)."""
    elf64 = guest_image(name)  # fails with a 'make guests' hint when the build is missing
    elf32 = Path(f"{elf64}32")
    if not elf32.is_file():
        pytest.fail(f"guest image {elf32} is not built: run 'make guests'")
    p = subprocess.run(
        [
            QEMU,
            "-accel",
            "kvm",
            # Plain "-cpu host" makes QEMU 7.2 fail setting MSR 0x10a (IA32_ARCH_CAPABILITIES)
            # on this nested KVM; dropping that one feature keeps the host CPU otherwise.
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            "1G",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-display",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            str(elf32),
            "-append",
            cmdline,
        ],
        capture_output=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    return Completed(p.returncode, p.stdout, p.stderr.decode(errors="replace"))


def qemu_exit_status(guest_value: int) -> int:
    """isa-debug-exit turns the guest's write v into process status (v << 1) | 1."""
    return (guest_value << 1) | 1


@pytest.mark.parametrize(
    "cmdline",
    [
        "wss=64M pattern=seq rounds=3",
        "wss=48M pattern=random seed=20240917 rounds=2",
    ],
)
def test_memtouch_gives_the_same_result_under_qemu(cmdline: str) -> None:
    ours = vmferry("run", "memtouch", "--vcpus", "1", "--", cmdline, timeout=TIMEOUT_S)
    assert ours.returncode == 0, ours.stderr
    assert ours.result is not None, ours.stdout

    ref = qemu("memtouch", cmdline)
    assert ref.returncode == qemu_exit_status(0), (ref.stdout[-2000:], ref.stderr)
    assert ref.result == ours.result


def test_cpustate_is_ok_under_qemu_and_vmferry() -> None:
    ours = vmferry("run", "cpustate", "--", "park=1000", timeout=TIMEOUT_S)
    assert ours.returncode == 0, (ours.stdout, ours.stderr)
    assert b"CPUSTATE OK" in ours.stdout and b"CHANGED" not in ours.stdout

    # Under QEMU the halt port is unassigned, so the park returns at once: the check still
    # runs against a real reference CPU. SeaBIOS may leave text on the same line, so look
    # for the marker anywhere rather than at a line start.
    ref = qemu("cpustate", "park=1000")
    assert ref.returncode == qemu_exit_status(0), (ref.stdout[-2000:], ref.stderr)
    assert b"CPUSTATE OK" in ref.stdout, ref.stdout[-2000:]
    assert b"CHANGED" not in ref.stdout, ref.stdout[-2000:]
