"""Saved machine state as plain data, separate from fds and threads.

``capture_vcpu(handle) -> VcpuState`` and ``apply_vcpu(handle, state)`` run on the vCPU's own
thread while it is paused; ``VcpuState`` and ``MachineState`` serialise to JSON-able dicts
(blobs as hex), checked field by field on the way back in.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import KvmError, StreamError
from vmferry.kvm import uapi
from vmferry.kvm.vcpu import VcpuHandle
from vmferry.machine.config import MachineConfig

log = logging.getLogger(__name__)

REG_NAMES = uapi.REG_NAMES

# MSRs whose loss would change what the guest sees; a refusal to restore them is an error.
ESSENTIAL_MSRS = {
    uapi.MSR_IA32_TSC: "IA32_TSC",
    uapi.MSR_IA32_CR_PAT: "IA32_PAT",
    uapi.MSR_STAR: "STAR",
    uapi.MSR_LSTAR: "LSTAR",
    uapi.MSR_CSTAR: "CSTAR",
    uapi.MSR_SFMASK: "SFMASK",
    uapi.MSR_FS_BASE: "FS_BASE",
    uapi.MSR_GS_BASE: "GS_BASE",
    uapi.MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
    uapi.MSR_TSC_AUX: "TSC_AUX",
}


@dataclass
class VcpuState:
    index: int
    regs: dict[str, int]
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    events: bytes
    debugregs: bytes
    mp_state: int
    msrs: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "regs": self.regs,
            "sregs": self.sregs.hex(),
            "xsave": self.xsave.hex(),
            "xcrs": self.xcrs.hex(),
            "events": self.events.hex(),
            "debugregs": self.debugregs.hex(),
            "mp_state": self.mp_state,
            "msrs": {f"{k:#x}": v for k, v in self.msrs.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VcpuState:
        try:
            regs = {name: int(d["regs"][name]) for name in REG_NAMES}
            st = cls(
                index=int(d["index"]),
                regs=regs,
                sregs=bytes.fromhex(d["sregs"]),
                xsave=bytes.fromhex(d["xsave"]),
                xcrs=bytes.fromhex(d["xcrs"]),
                events=bytes.fromhex(d["events"]),
                debugregs=bytes.fromhex(d["debugregs"]),
                mp_state=int(d["mp_state"]),
                msrs={int(k, 16): int(v) for k, v in d["msrs"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StreamError(f"vCPU state is malformed: {e!r}") from e
        for name, blob, size in (
            ("sregs", st.sregs, ctypes.sizeof(uapi.KvmSregs)),
            ("xcrs", st.xcrs, uapi.SIZEOF_XCRS),
            ("events", st.events, uapi.SIZEOF_VCPU_EVENTS),
            ("debugregs", st.debugregs, uapi.SIZEOF_DEBUGREGS),
        ):
            if len(blob) != size:
                raise StreamError(f"vCPU {st.index} {name} is {len(blob)} bytes, want {size}")
        if len(st.xsave) < uapi.SIZEOF_XSAVE or len(st.xsave) % 4:
            raise StreamError(f"vCPU {st.index} xsave is {len(st.xsave)} bytes")
        if not all(0 <= v < 1 << 64 for v in (*st.regs.values(), *st.msrs.values())):
            raise StreamError(f"vCPU {st.index} has a register value out of 64-bit range")
        return st


@dataclass
class MachineState:
    config: MachineConfig
    clock: bytes
    vcpus: list[VcpuState] = field(default_factory=list)


def capture_vcpu(handle: VcpuHandle, msr_indices: list[int]) -> VcpuState:
    regs = handle.get_regs()
    return VcpuState(
        index=handle.index,
        regs={name: int(getattr(regs, name)) for name in REG_NAMES},
        sregs=bytes(handle.get_sregs()),
        xsave=handle.get_xsave(),
        xcrs=handle.get_xcrs(),
        events=handle.get_vcpu_events(),
        debugregs=handle.get_debugregs(),
        mp_state=handle.get_mp_state(),
        msrs=handle.get_msrs(msr_indices),
    )


def apply_vcpu(handle: VcpuHandle, st: VcpuState) -> None:
    """Load a saved state; the order follows what KVM needs (modes before registers)."""
    handle.set_sregs(uapi.KvmSregs.from_buffer_copy(st.sregs))
    handle.set_xcrs(st.xcrs)
    handle.set_xsave(st.xsave)
    regs = uapi.KvmRegs()
    for name, value in st.regs.items():
        setattr(regs, name, value)
    handle.set_regs(regs)
    refused = handle.set_msrs(st.msrs)
    lost = [f"{ESSENTIAL_MSRS[m]} ({m:#x})" for m in refused if m in ESSENTIAL_MSRS]
    if lost:
        raise KvmError("KVM_SET_MSRS", 22, f"vCPU {st.index} refused {', '.join(lost)}")
    if refused:
        log.debug("vCPU %d: KVM refused MSRs %s", st.index, [hex(m) for m in refused])
    handle.set_vcpu_events(st.events)
    handle.set_mp_state(st.mp_state)
    handle.set_debugregs(st.debugregs)
