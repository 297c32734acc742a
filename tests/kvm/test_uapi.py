"""Every ioctl number and struct size vmferry uses, checked against the system's kvm.h."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from vmferry.kvm import uapi

NAMES = [
    n
    for n in dir(uapi)
    if n.startswith(
        (
            "KVM_GET_",
            "KVM_SET_",
            "KVM_CREATE_",
            "KVM_CAP_",
            "KVM_EXIT_",
            "KVM_RUN",
            "KVM_CHECK",
            "KVM_ENABLE",
            "KVM_CLEAR",
        )
    )
    and not n.startswith(("KVM_EXIT_IO_",))
]
STRUCTS = {
    "kvm_regs": uapi.KvmRegs,
    "kvm_sregs": uapi.KvmSregs,
    "kvm_segment": uapi.KvmSegment,
    "kvm_userspace_memory_region": uapi.KvmUserspaceMemoryRegion,
    "kvm_dirty_log": uapi.KvmDirtyLog,
    "kvm_clear_dirty_log": uapi.KvmClearDirtyLog,
    "kvm_enable_cap": uapi.KvmEnableCap,
    "kvm_cpuid_entry2": uapi.KvmCpuidEntry2,
    "kvm_msr_entry": uapi.KvmMsrEntry,
    "kvm_clock_data": uapi.KvmClockData,
}
BLOBS = {
    "kvm_fpu": uapi.SIZEOF_FPU,
    "kvm_xsave": uapi.SIZEOF_XSAVE,
    "kvm_xcrs": uapi.SIZEOF_XCRS,
    "kvm_vcpu_events": uapi.SIZEOF_VCPU_EVENTS,
    "kvm_debugregs": uapi.SIZEOF_DEBUGREGS,
    "kvm_mp_state": uapi.SIZEOF_MP_STATE,
}


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not shutil.which("gcc") or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs gcc and the Linux uAPI headers (linux-libc-dev)")
    d = tmp_path_factory.mktemp("uapi")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    lines += [f'printf("{n} %lu\\n", (unsigned long)({n}));' for n in NAMES]
    lines += [f'printf("sizeof_{s} %zu\\n", sizeof(struct {s}));' for s in [*STRUCTS, *BLOBS]]
    lines += ['printf("off_io %zu\\n", offsetof(struct kvm_run, io));', "return 0; }"]
    (d / "dump.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(d / "dump"), str(d / "dump.c")], check=True)
    out = subprocess.run([str(d / "dump")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_ioctl_numbers_and_constants_match_kernel_headers(header_values: dict[str, int]) -> None:
    wrong = {
        n: (hex(getattr(uapi, n)), hex(header_values[n]))
        for n in NAMES
        if getattr(uapi, n) != header_values[n]
    }
    assert not wrong, f"constants differ from <linux/kvm.h> (ours, kernel's): {wrong}"


def test_struct_sizes_match_kernel_headers(header_values: dict[str, int]) -> None:
    for name, cls in STRUCTS.items():
        assert ctypes.sizeof(cls) == header_values[f"sizeof_{name}"], name
    for name, size in BLOBS.items():
        assert size == header_values[f"sizeof_{name}"], name
    assert uapi.KvmRunHeader.exit.offset == header_values["off_io"]
