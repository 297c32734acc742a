"""The register state a multiboot image starts with (32-bit protected mode, paging off)."""

from __future__ import annotations

from vmferry.kvm import uapi
from vmferry.machine.multiboot import MULTIBOOT_BOOTLOADER_MAGIC

SECONDARY_VCPU_MAGIC = 0x564D4650  # "VMFP": tells an image it is not vCPU 0; ESI = index
CR0_PE, CR0_ET = 1 << 0, 1 << 4


def _flat(seg: uapi.KvmSegment, selector: int, seg_type: int) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, seg_type
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1


def boot_sregs(sregs: uapi.KvmSregs) -> None:
    _flat(sregs.cs, 0x08, 0xB)  # execute/read, accessed
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat(seg, 0x10, 0x3)  # read/write, accessed
    # A valid busy TSS and an LDT are required for VM entry, even if the guest never uses them.
    sregs.tr.base, sregs.tr.limit, sregs.tr.selector = 0, 0xFFFF, 0
    sregs.tr.type, sregs.tr.present, sregs.tr.s = 0xB, 1, 0
    sregs.ldt.base, sregs.ldt.limit, sregs.ldt.type, sregs.ldt.present = 0, 0xFFFF, 0x2, 1
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr3 = sregs.cr4 = sregs.efer = 0


def boot_regs(index: int, entry: int, mbi_addr: int) -> uapi.KvmRegs:
    regs = uapi.KvmRegs()
    regs.rip, regs.rflags = entry, 0x2
    if index == 0:
        regs.rax, regs.rbx = MULTIBOOT_BOOTLOADER_MAGIC, mbi_addr
    else:
        regs.rax, regs.rsi = SECONDARY_VCPU_MAGIC, index
    return regs
