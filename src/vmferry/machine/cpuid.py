"""The CPUID a guest sees: the host's supported set, plus topology and the TSC frequency."""

from __future__ import annotations

from dataclasses import replace

from vmferry.kvm.system import CpuidEntry

CPUID_HTT = 1 << 28
HYPERVISOR_BASE_LEAF = 0x40000000
TIMING_LEAF = 0x40000010  # TSC kHz in EAX: the leaf VMware defined and KVM/QEMU also offer


def guest_cpuid(
    supported: list[CpuidEntry], index: int, nvcpus: int, tsc_khz: int
) -> list[CpuidEntry]:
    out: list[CpuidEntry] = []
    for e in supported:
        if e.function == 1:
            ebx = (e.ebx & 0x0000FFFF) | (nvcpus << 16) | (index << 24)
            edx = e.edx | CPUID_HTT if nvcpus > 1 else e.edx & ~CPUID_HTT
            e = replace(e, ebx=ebx, edx=edx)
        elif e.function in (0xB, 0x1F):
            e = replace(e, edx=index)
        elif e.function == HYPERVISOR_BASE_LEAF:
            e = replace(e, eax=max(e.eax, TIMING_LEAF))
        elif e.function == TIMING_LEAF:
            continue
        out.append(e)
    out.append(CpuidEntry(TIMING_LEAF, 0, 0, tsc_khz, 0, 0, 0))
    return out
