"""The render/compute engine: runs scanned commands for real, with numpy over the vGPU's
VRAM share and over guest RAM by DMA through its IOMMU (so KVM's dirty log never sees
those writes). It trusts the scanner: every segment it gets was translated and checked.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmferry.devices.iommu import Iommu
from vmferry.devices.vgpu.ggtt import KIND_SYS, KIND_VRAM, Segment
from vmferry.devices.vgpu.scanner import (
    COMPUTE_MATMUL,
    OP_BLIT,
    OP_COMPUTE,
    OP_COPY,
    OP_FENCE,
    OP_FILL,
    Command,
)
from vmferry.devices.vgpu.vram import VramShare

U64 = 0xFFFF_FFFF_FFFF_FFFF


def reduce_words(words: npt.NDArray[np.uint64], key: int) -> int:
    """REDUCE: Σ w_i·(2i+1) + key, modulo 2⁶⁴ (numpy's uint64 arithmetic wraps)."""
    mult = np.arange(1, 2 * words.size, 2, dtype=np.uint64)
    return (int(np.sum(words * mult, dtype=np.uint64)) + key) & U64


def matmul_u32(
    a: npt.NDArray[np.uint32], b: npt.NDArray[np.uint32], key: int
) -> npt.NDArray[np.uint32]:
    """MATMUL: C = A·B + key, element-wise modulo 2³² (exact: products summed in uint64)."""
    c = a.astype(np.uint64) @ b.astype(np.uint64)
    return ((c + np.uint64(key & 0xFFFF_FFFF)) & np.uint64(0xFFFF_FFFF)).astype(np.uint32)


class Engine:
    """One vGPU's view of the engine: its VRAM share and its IOMMU domain."""

    def __init__(self, vram: VramShare, iommu: Iommu) -> None:
        self.vram = vram
        self.iommu = iommu

    def read(self, segs: list[Segment]) -> npt.NDArray[np.uint8]:
        parts = [
            self.vram.bytes[a : a + n] if k == KIND_VRAM else self.iommu.read(a, n)
            for k, a, n in segs
        ]
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def write(self, segs: list[Segment], data: npt.NDArray[np.uint8]) -> None:
        pos = 0
        for k, a, n in segs:
            if k == KIND_VRAM:
                self.vram.bytes[a : a + n] = data[pos : pos + n]
                self.vram.written(a, n)  # after the bytes: see VramShare
            else:
                self.iommu.write(a, data[pos : pos + n])
            pos += n

    def request_pages(self, cmd: Command) -> None:
        """Page requests for all the guest RAM a command reads and writes, at once (a
        gated IOMMU in post-copy: one round trip, not one per segment or BLIT row)."""
        if self.iommu.page_gate is None:
            return
        ram = [(a, n) for segs in (*cmd.reads, *cmd.writes) for k, a, n in segs if k == KIND_SYS]
        self.iommu.request_pages(ram, f"vGPU {cmd.name}")

    def run(self, cmd: Command, key: int) -> int | None:
        """Execute one command; returns a FENCE's value (None for other commands). Its
        pages are the caller's to ask for first (request_pages), outside any lock."""
        op, arg = cmd.opcode, cmd.args
        if op == OP_FILL:
            pattern = np.full(arg[1] // 8, arg[2], dtype=np.uint64).view(np.uint8)
            self.write(cmd.writes[0], pattern)
        elif op == OP_COPY:
            self.write(cmd.writes[0], self.read(cmd.reads[0]))
        elif op == OP_BLIT:
            # Read every row before writing any: overlapping blits behave like memmove.
            rows = [self.read(r) for r in cmd.reads]
            for segs, row in zip(cmd.writes, rows, strict=True):
                self.write(segs, row)
        elif op == OP_COMPUTE:
            self._compute(cmd, key)
        elif op == OP_FENCE:
            self.write(cmd.writes[0], np.array([arg[1]], dtype=np.uint64).view(np.uint8))
            return int(arg[1])
        return None

    def _compute(self, cmd: Command, key: int) -> None:
        arg = cmd.args
        if arg[0] == COMPUTE_MATMUL:
            m, n, k = arg[4], arg[5], arg[6]
            a = self.read(cmd.reads[0]).view(np.uint32).reshape(m, k)
            b = self.read(cmd.reads[1]).view(np.uint32).reshape(k, n)
            self.write(cmd.writes[0], matmul_u32(a, b, key).view(np.uint8).ravel())
        else:
            words = self.read(cmd.reads[0]).view(np.uint64)
            out = np.array([reduce_words(words, key)], dtype=np.uint64)
            self.write(cmd.writes[0], out.view(np.uint8))
