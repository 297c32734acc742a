"""The command scanner: table-driven bad commands, and a fuzzer over command buffers
whose verdicts are checked against an independent model of the rules, with canaries in
the neighbouring vGPU's VRAM, in this vGPU's unmapped VRAM and in the rest of guest RAM."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.devices.vgpu.helpers import (
    RING,
    SYS,
    SYS_VA,
    make_vgpu,
    map_system,
    map_vram,
    start_ring,
    submit_raw,
    wait_idle,
)
from vmferry.devices.vgpu import registers as R
from vmferry.devices.vgpu.context import ERR_BAD_COMMAND, ERR_GPU_FAULT
from vmferry.devices.vgpu.device import Vgpu
from vmferry.devices.vgpu.scanner import CMD, MAX_BLIT_ROWS, MAX_DIM, MAX_LEN, MAX_PITCH
from vmferry.memory import GuestMemory

VRAM_PAGES, SYS_PAGES = 64, 64
VRAM_END, SYS_END = VRAM_PAGES * 4096, SYS_VA + SYS_PAGES * 4096
CANARY = 0xA5


class Rig:
    """vGPU A under test, neighbour B on the same parent, canaries everywhere else."""

    def __init__(self) -> None:
        self.memory = GuestMemory(32 << 20)
        self.a = make_vgpu(self.memory, "vgpu,type=vgpu-4,vram=16M")
        self.b_memory = GuestMemory(16 << 20)
        self.b = make_vgpu(self.b_memory, "vgpu,type=vgpu-4,vram=16M")
        map_vram(self.a, VRAM_PAGES)
        map_system(self.a, SYS, SYS_PAGES)
        start_ring(self.a, size=64)
        parent = self.a.gpu.vram.bytes
        parent[:] = CANARY
        parent[:VRAM_END] = 0  # A's mapped pages start at 0
        self.memory.bytes[:] = CANARY
        self.memory.bytes[RING : RING + 64 * 64] = 0
        self.memory.bytes[SYS : SYS + SYS_PAGES * 4096] = 0

    def canaries_intact(self) -> None:
        parent = self.a.gpu.vram.bytes
        a_off = self.a.vram.offset
        outside_a = np.concatenate([parent[:a_off], parent[a_off + VRAM_END :]])
        assert (outside_a == CANARY).all(), "a write landed outside A's mapped VRAM"
        ram = self.memory.bytes
        rest = np.concatenate(
            [ram[:RING], ram[RING + 64 * 64 : SYS], ram[SYS + SYS_PAGES * 4096 :]]
        )
        assert (rest == CANARY).all(), "a write landed in guest RAM outside the GGTT window"

    def close(self) -> None:
        for d, m in ((self.a, self.memory), (self.b, self.b_memory)):
            d.close()
            m.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def run_one(dev: Vgpu, raw: bytes) -> int:
    """Submit one command; the error code it got (0: it ran). Clears the error after."""
    submit_raw(dev, [raw])
    wait_idle(dev, errors_ok=True)
    code = dev.mmio_read(R.ERROR_CODE, 4)
    if code:
        assert dev.mmio_read(R.RING_HEAD, 4) != dev.mmio_read(R.RING_TAIL, 4), "ran anyway"
        dev.mmio_write(R.CTRL, 4, 0)
        dev.mmio_write(R.CTRL, 4, 1)  # skip it
    return int(code)


def cmd(op: int, *args: int, flags: int = 0) -> bytes:
    return CMD.pack(op, flags, *args, *([0] * (7 - len(args))))


BAD = [
    ("unknown opcode", cmd(9), ERR_BAD_COMMAND),
    ("flags set", cmd(1, 0, 8, 0, flags=1), ERR_BAD_COMMAND),
    ("NOP with an argument", cmd(0, 1), ERR_BAD_COMMAND),
    ("FILL length 0", cmd(1, 0, 0, 0), ERR_BAD_COMMAND),
    ("FILL length not a multiple of 8", cmd(1, 0, 12, 0), ERR_BAD_COMMAND),
    ("FILL too long", cmd(1, 0, MAX_LEN + 8, 0), ERR_BAD_COMMAND),
    ("FILL past mapped VRAM", cmd(1, VRAM_END - 8, 16, 0), ERR_GPU_FAULT),
    ("FILL an unmapped page", cmd(1, 0x800000, 8, 0), ERR_GPU_FAULT),
    ("FILL past the GGTT", cmd(1, 1 << 40, 8, 0), ERR_GPU_FAULT),
    ("FILL with a used 4th argument", cmd(1, 0, 8, 0, 1), ERR_BAD_COMMAND),
    ("COPY from unmapped", cmd(2, 0x900000, 0, 64), ERR_GPU_FAULT),
    ("COPY to past the RAM window", cmd(2, 0, SYS_END - 32, 64), ERR_GPU_FAULT),
    ("BLIT pitch below width", cmd(3, 0, 0x8000, 16, 64, 32, 2), ERR_BAD_COMMAND),
    ("BLIT too many rows", cmd(3, 0, 0x8000, 64, 64, 8, MAX_BLIT_ROWS + 1), ERR_BAD_COMMAND),
    ("BLIT pitch too big", cmd(3, 0, 0, MAX_PITCH + 1, 64, 8, 1), ERR_BAD_COMMAND),
    ("BLIT last row unmapped", cmd(3, 0, 0x8000, 4096, 4096, 64, 70), ERR_GPU_FAULT),
    ("COMPUTE unknown op", cmd(4, 3), ERR_BAD_COMMAND),
    ("MATMUL too big", cmd(4, 1, 0, 0, 0, MAX_DIM + 1, 1, 1), ERR_BAD_COMMAND),
    ("MATMUL misaligned", cmd(4, 1, 2, 0, 0, 2, 2, 2), ERR_BAD_COMMAND),
    ("MATMUL output unmapped", cmd(4, 1, 0, 0, VRAM_END - 4, 2, 2, 2), ERR_GPU_FAULT),
    ("REDUCE with a 5th argument", cmd(4, 2, 0, 1, 0, 1), ERR_BAD_COMMAND),
    ("FENCE misaligned", cmd(5, SYS_VA + 4, 1, 0), ERR_BAD_COMMAND),
    ("FENCE register beyond this type", cmd(5, SYS_VA, 1, 8), ERR_BAD_COMMAND),
    ("FENCE unmapped", cmd(5, 0x7000000, 1, 0), ERR_GPU_FAULT),
]


@pytest.mark.parametrize(("what", "raw", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_commands_are_refused_with_an_error_and_touch_nothing(
    rig: Rig, what: str, raw: bytes, code: int
) -> None:
    head = rig.a.mmio_read(R.RING_HEAD, 4)
    assert run_one(rig.a, raw) == code, what
    assert rig.a.mmio_read(R.COMPLETED, 8) == 0
    assert rig.a.mmio_read(R.RING_HEAD, 4) == head + 1  # skipped by the re-enable
    rig.canaries_intact()
    # …and the vGPU goes on working.
    assert run_one(rig.a, cmd(1, 0, 64, 7)) == 0


# ---- the fuzzer, with its own statement of the rules


def _in(lo: int, hi: int, a: int, n: int) -> bool:
    return lo <= a and a + n <= hi


def _mapped(a: int, n: int) -> bool:
    return _in(0, VRAM_END, a, n) or _in(SYS_VA, SYS_END, a, n)


def expected_error(op: int, flags: int, args: list[int]) -> int:
    """The verdict the data sheet (docs/devices/vgpu.md) gives, written independently."""
    used = {0: 0, 1: 3, 2: 3, 3: 6, 5: 3}.get(op)
    if op == 4:
        used = {1: 7, 2: 4}.get(args[0])
    if used is None or flags or any(args[used:]):
        return ERR_BAD_COMMAND
    ranges: list[tuple[int, int]] = []
    if op == 1:
        dst, n, _ = args[:3]
        if not (1 <= n <= MAX_LEN and n % 8 == 0):
            return ERR_BAD_COMMAND
        ranges = [(dst, n)]
    elif op == 2:
        src, dst, n = args[:3]
        if not 1 <= n <= MAX_LEN:
            return ERR_BAD_COMMAND
        ranges = [(src, n), (dst, n)]
    elif op == 3:
        src, dst, sp, dp, w, h = args[:6]
        if not (
            1 <= w <= MAX_PITCH
            and 1 <= h <= MAX_BLIT_ROWS
            and w * h <= MAX_LEN
            and w <= sp <= MAX_PITCH
            and w <= dp <= MAX_PITCH
        ):
            return ERR_BAD_COMMAND
        ranges = [(src + r * sp, w) for r in range(h)] + [(dst + r * dp, w) for r in range(h)]
    elif op == 4 and args[0] == 1:
        _, a, b, c, m, n, k = args
        if not all(1 <= d <= MAX_DIM for d in (m, n, k)) or a % 4 or b % 4 or c % 4:
            return ERR_BAD_COMMAND
        ranges = [(a, 4 * m * k), (b, 4 * k * n), (c, 4 * m * n)]
    elif op == 4:
        _, src, words, dst = args[:4]
        if not 1 <= words <= MAX_LEN // 8 or src % 8 or dst % 8:
            return ERR_BAD_COMMAND
        ranges = [(src, 8 * words), (dst, 8)]
    elif op == 5:
        addr, _, reg = args[:3]
        if addr % 8 or reg >= 8:
            return ERR_BAD_COMMAND
        ranges = [(addr, 8)]
    return 0 if all(_mapped(a, n) for a, n in ranges) else ERR_GPU_FAULT


ADDRS = st.one_of(
    st.integers(0, VRAM_END + 8192),
    st.integers(SYS_VA - 8192, SYS_END + 8192),
    st.sampled_from([0, VRAM_END - 8, SYS_VA, SYS_END - 8, 1 << 30, (1 << 64) - 8]),
)
SMALL = st.one_of(st.integers(0, 300), st.sampled_from([4096, 65536, MAX_LEN, MAX_LEN + 8]))


@st.composite
def commands(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    op = draw(st.integers(0, 6))
    flags = draw(st.sampled_from([0, 0, 0, 0, 1]))
    if op == 4:
        sub = draw(st.sampled_from([1, 2, 2, 3]))
        args = [sub, draw(ADDRS), draw(ADDRS) if sub == 1 else draw(SMALL), draw(ADDRS)]
        args += [draw(st.integers(0, 70)) for _ in range(3)] if sub == 1 else [0, 0, 0]
    elif op == 3:
        args = [
            draw(ADDRS),
            draw(ADDRS),
            draw(SMALL),
            draw(SMALL),
            draw(SMALL),
            draw(st.integers(0, 40)),
            0,
        ]
    else:
        args = [draw(ADDRS), draw(SMALL) if op == 1 else draw(ADDRS), draw(SMALL), 0, 0, 0, 0]
        if op == 5:
            args[1], args[2] = draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 10))
    if draw(st.integers(0, 9)) == 0:  # now and then, junk in an unused argument
        args[draw(st.integers(0, 6))] = draw(st.integers(1, 2**64 - 1))
    return op, flags, args


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(buffer=st.lists(commands(), min_size=1, max_size=4))
def test_fuzzed_command_buffers_obey_the_rules_and_never_escape(
    rig: Rig, buffer: list[tuple[int, int, list[int]]]
) -> None:
    for op, flags, args in buffer:
        want = expected_error(op, flags, args)
        got = run_one(rig.a, CMD.pack(op, flags, *args))
        assert got == want, f"op {op} flags {flags} args {[hex(a) for a in args]}"
    rig.canaries_intact()
    # The neighbour never noticed.
    assert rig.b.mmio_read(R.COMPLETED, 8) == 0 and rig.b.mmio_read(R.STATUS, 4) == 0
