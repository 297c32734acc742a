"""The command scanner: every command is parsed and checked before the engine runs it.

A command is 64 bytes: ``u32 opcode, u32 flags, u64 arg[7]``. The scanner checks the
opcode, that flags and unused arguments are 0, every length and dimension, and
translates every GPU address through the shadow GGTT — so a command that passes can
touch only this vGPU's VRAM share and its guest's RAM, and the mediator knows, before it
runs, every guest page it will write (mediated dirty tracking). See docs/devices/vgpu.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmferry.devices.vgpu.ggtt import KIND_SYS, Ggtt, GpuFault, Segment

CMD = struct.Struct("<II7Q")
CMD_SIZE = CMD.size  # 64
OP_NOP, OP_FILL, OP_COPY, OP_BLIT, OP_COMPUTE, OP_FENCE = 0, 1, 2, 3, 4, 5
OPCODES = (OP_NOP, OP_FILL, OP_COPY, OP_BLIT, OP_COMPUTE, OP_FENCE)
OP_NAMES = {0: "NOP", 1: "FILL", 2: "COPY", 3: "BLIT", 4: "COMPUTE", 5: "FENCE"}
COMPUTE_MATMUL, COMPUTE_REDUCE = 1, 2

MAX_LEN = 16 << 20
MAX_BLIT_ROWS = 4096
MAX_PITCH = 1 << 20
MAX_DIM = 256
# How many of arg[0..6] each opcode (and COMPUTE sub-op) uses; the rest must be 0.
ARGS_USED = {OP_NOP: 0, OP_FILL: 3, OP_COPY: 3, OP_BLIT: 6, OP_FENCE: 3}
COMPUTE_ARGS_USED = {COMPUTE_MATMUL: 7, COMPUTE_REDUCE: 4}


class BadCommand(Exception):
    """A command the mediator refuses: the vGPU reports an error, nothing runs."""


@dataclass
class Command:
    opcode: int
    args: tuple[int, ...]
    reads: list[list[Segment]] = field(default_factory=list)  # per operand (BLIT: per row)
    writes: list[list[Segment]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return OP_NAMES[self.opcode]

    def system_writes(self) -> list[tuple[int, int]]:
        """(guest-physical address, length) of every guest RAM write this command makes."""
        return [(a, n) for segs in self.writes for k, a, n in segs if k == KIND_SYS]


def _length(n: int, what: str, *, multiple: int = 1, most: int = MAX_LEN) -> int:
    if not 1 <= n <= most or n % multiple:
        raise BadCommand(f"{what} {n} is not 1..{most} in multiples of {multiple}")
    return n


def scan(raw: bytes, ggtt: Ggtt, fences: int) -> Command:
    """Parse and check one command; raise BadCommand or GpuFault (nothing has run)."""
    if len(raw) != CMD_SIZE:
        raise BadCommand(f"command is {len(raw)} bytes, not {CMD_SIZE}")
    opcode, flags, *arg = CMD.unpack(raw)
    if opcode not in OPCODES:
        raise BadCommand(f"unknown opcode {opcode}")
    if flags:
        raise BadCommand(f"{OP_NAMES[opcode]}: flags {flags:#x} must be 0")
    used = COMPUTE_ARGS_USED.get(arg[0], 0) if opcode == OP_COMPUTE else ARGS_USED[opcode]
    if opcode == OP_COMPUTE and not used:
        raise BadCommand(f"COMPUTE: unknown operation {arg[0]}")
    if any(arg[used:]):
        raise BadCommand(f"{OP_NAMES[opcode]}: unused arguments must be 0")
    cmd = Command(opcode, tuple(arg))
    t = ggtt.translate
    if opcode == OP_FILL:
        dst, n, _value = arg[:3]
        cmd.writes = [t(dst, _length(n, "FILL length", multiple=8))]
    elif opcode == OP_COPY:
        src, dst, n = arg[:3]
        _length(n, "COPY length")
        cmd.reads, cmd.writes = [t(src, n)], [t(dst, n)]
    elif opcode == OP_BLIT:
        src, dst, sp, dp, w, h = arg[:6]
        _length(w, "BLIT width", most=MAX_PITCH)
        _length(h, "BLIT height", most=MAX_BLIT_ROWS)
        if w * h > MAX_LEN or not w <= sp <= MAX_PITCH or not w <= dp <= MAX_PITCH:
            raise BadCommand(f"BLIT {w}x{h} with pitches {sp}/{dp} is out of bounds")
        cmd.reads = _rows(ggtt, src, sp, w, h)
        cmd.writes = _rows(ggtt, dst, dp, w, h)
    elif opcode == OP_COMPUTE:
        _scan_compute(cmd, arg, ggtt)
    elif opcode == OP_FENCE:
        addr, _value, reg = arg[:3]
        if addr % 8:
            raise BadCommand(f"FENCE address {addr:#x} is not 8-byte aligned")
        if reg >= fences:
            raise BadCommand(f"FENCE register {reg} (this vGPU has {fences})")
        cmd.writes = [t(addr, 8)]
    return cmd


def _rows(ggtt: Ggtt, base: int, pitch: int, width: int, height: int) -> list[list[Segment]]:
    """A 2D region's rows: from one translation of the whole span when it is a single run
    of memory (the usual surface), else row by row (rows between unmapped gaps)."""
    try:
        span = ggtt.translate(base, (height - 1) * pitch + width)
    except GpuFault:
        span = []
    if len(span) == 1:
        kind, addr, _ = span[0]
        return [[(kind, addr + r * pitch, width)] for r in range(height)]
    return [ggtt.translate(base + r * pitch, width) for r in range(height)]


def _scan_compute(cmd: Command, arg: list[int], ggtt: Ggtt) -> None:
    t = ggtt.translate
    if arg[0] == COMPUTE_MATMUL:
        _, a, b, c, m, n, k = arg
        for d, what in ((m, "m"), (n, "n"), (k, "k")):
            _length(d, f"MATMUL {what}", most=MAX_DIM)
        if a % 4 or b % 4 or c % 4:
            raise BadCommand("MATMUL matrices must be 4-byte aligned")
        cmd.reads = [t(a, 4 * m * k), t(b, 4 * k * n)]
        cmd.writes = [t(c, 4 * m * n)]
    else:
        _, src, words, dst = arg[:4]
        _length(words, "REDUCE words", most=MAX_LEN // 8)
        if src % 8 or dst % 8:
            raise BadCommand("REDUCE operands must be 8-byte aligned")
        cmd.reads = [t(src, 8 * words)]
        cmd.writes = [t(dst, 8)]


__all__ = ["CMD", "BadCommand", "Command", "GpuFault", "scan"]
