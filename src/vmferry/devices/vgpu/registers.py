"""The vGPU's MMIO register map (32-bit accesses; 64-bit registers as two halves, low
first). Reads and writes go to the mediator's shadows in the context, under its lock."""

from __future__ import annotations

from vmferry.devices.vgpu.context import (
    CTRL_ENABLE,
    ERR_NONE,
    STATUS_BUSY,
    STATUS_ERROR,
    U32,
    VgpuContext,
)

ID = 0x55504756  # "VGPU"
CAPS_BITS = 0b111111  # fill, copy, blit, compute, fence, aperture

ID_, VERSION, CAPS, CTRL = 0x000, 0x004, 0x008, 0x00C
RING_BASE, RING_SIZE, RING_TAIL, RING_HEAD = 0x010, 0x018, 0x01C, 0x020
STATUS, IRQ_STATUS, ERROR_CODE, ERROR_ADDR = 0x024, 0x028, 0x02C, 0x030
KEY, COMPLETED, FENCE_VALUE = 0x038, 0x040, 0x048
GGTT_INDEX, GGTT_REFUSED, GGTT_DATA = 0x050, 0x054, 0x058
VRAM_SIZE, BUSY_NS, APERTURE_BASE = 0x060, 0x068, 0x070
GGTT_ENTRIES, FENCES, TYPE_PARTS = 0x078, 0x07C, 0x080
FENCE_REG = 0x100  # + 8 × i, 64-bit, read-only: the value of the last FENCE on register i
APERTURE = 0x800  # 2 KiB window on GPU memory at APERTURE_BASE, through the shadow GGTT
APERTURE_SIZE = 0x800


def _half(value: int, offset: int, base: int) -> int:
    return (value >> (8 * (offset - base))) & U32


def _set_half(old: int, offset: int, base: int, value: int) -> int:
    shift = 8 * (offset - base)
    return (old & ~(U32 << shift)) | (value << shift)


def read32(version: int, ctx: VgpuContext, offset: int) -> int:
    """``version``: the model version the device reports (a destination may pin another)."""
    r = ctx.regs
    simple = {
        ID_: ID,
        VERSION: version,
        CAPS: CAPS_BITS,
        CTRL: r.ctrl,
        RING_SIZE: r.ring_size,
        RING_TAIL: r.ring_tail,
        RING_HEAD: r.ring_head,
        ERROR_CODE: r.error_code,
        GGTT_INDEX: r.ggtt_index,
        GGTT_ENTRIES: ctx.ggtt.entries,
        FENCES: ctx.type.fences,
        TYPE_PARTS: ctx.type.parts,
    }
    if offset in simple:
        return simple[offset]
    if offset == STATUS:
        busy = ctx.busy or (r.ring_head != r.ring_tail and bool(r.ctrl & CTRL_ENABLE))
        return (STATUS_BUSY if busy and not r.error else 0) | (STATUS_ERROR if r.error else 0)
    if offset == IRQ_STATUS:
        value, r.irq_status = r.irq_status, 0  # clear on read
        return value
    if offset == GGTT_REFUSED:
        value, r.ggtt_refused = r.ggtt_refused, 0  # clear on read
        return value
    wide = {
        RING_BASE: r.ring_base,
        ERROR_ADDR: r.error_addr,
        KEY: 0,  # write-only: reads 0
        COMPLETED: r.completed,
        FENCE_VALUE: r.fence_value,
        VRAM_SIZE: ctx.vram.size,
        BUSY_NS: ctx.busy_ns,
        APERTURE_BASE: r.aperture_base,
    }
    base = offset & ~7
    if base in wide:
        return _half(wide[base], offset, base)
    if base == GGTT_DATA:
        i = r.ggtt_index
        value = int(ctx.ggtt.guest[i]) if i < ctx.ggtt.entries else 0
        return _half(value, offset, base)
    if FENCE_REG <= base < FENCE_REG + 8 * ctx.type.fences:
        return _half(int(ctx.fence_regs[(base - FENCE_REG) // 8]), offset, base)
    return U32


def write32(ctx: VgpuContext, offset: int, value: int) -> None:
    r = ctx.regs
    base = offset & ~7
    if offset == CTRL:
        if value & CTRL_ENABLE and not r.ctrl & CTRL_ENABLE and r.error:
            # Re-enabling after an error skips the refused command, like dmaengine.
            r.error, r.error_code, r.error_addr = 0, ERR_NONE, 0
            r.ring_head = (r.ring_head + 1) & U32
        r.ctrl = value & CTRL_ENABLE
    elif base == RING_BASE:
        r.ring_base = _set_half(r.ring_base, offset, base, value)
    elif offset == RING_SIZE:
        r.ring_size = value
    elif offset == RING_TAIL:
        r.ring_tail = value  # the doorbell
    elif base == KEY:
        r.key = _set_half(r.key, offset, base, value)
    elif offset == GGTT_INDEX:
        r.ggtt_index = value
    elif offset == GGTT_DATA:
        r.ggtt_data_lo = value
    elif offset == GGTT_DATA + 4:
        # The high half commits the entry (an 8-byte write arrives as low, then high).
        if not ctx.ggtt.write(r.ggtt_index, r.ggtt_data_lo | (value << 32)):
            r.ggtt_refused += 1
        r.ggtt_index = (r.ggtt_index + 1) & U32
        r.ggtt_data_lo = 0
    elif base == APERTURE_BASE:
        r.aperture_base = _set_half(r.aperture_base, offset, base, value)
