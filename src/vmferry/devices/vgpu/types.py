"""vGPU types in the GVT-g way: each splits its parent's VRAM into 1, 2, 4 or 8 shares,
with fence registers and a scheduling weight in proportion."""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.errors import ConfigError

PARENT_MODEL = "vmferry-gpu"  # what a destination must also have (part of the identity)
MAX_VGPUS = 8  # per parent, as GVT-g limits a physical GPU
DEFAULT_PARENT = "gpu0"
DEFAULT_PARENT_VRAM = 4 << 30
MIN_PARENT_VRAM = 16 << 20
PARENT_FENCES = 32
GPU_PAGE = 4096
# GPU virtual address space per vGPU, in GGTT entries (4 KiB each): 1 GiB.
GGTT_ENTRIES = 1 << 18


@dataclass(frozen=True)
class VgpuType:
    name: str
    parts: int  # the parent's VRAM split this many ways

    @property
    def weight(self) -> int:
        """Scheduling weight: a bigger share of the GPU gets more engine time."""
        return 16 // self.parts

    @property
    def fences(self) -> int:
        return PARENT_FENCES // self.parts

    def share(self, parent_vram: int) -> int:
        return parent_vram // self.parts

    def describe(self, parent_vram: int) -> str:
        return (
            f"{self.share(parent_vram) >> 20} MiB VRAM, {self.fences} fences, weight {self.weight}"
        )


TYPES: dict[str, VgpuType] = {t.name: t for t in (VgpuType(f"vgpu-{p}", p) for p in (1, 2, 4, 8))}


def vgpu_type(name: str) -> VgpuType:
    try:
        return TYPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown vGPU type {name!r} (known: {', '.join(sorted(TYPES))})"
        ) from None


def check_parent_vram(size: int) -> int:
    # Every share must be whole GPU pages: VRAM is a power-of-two multiple of 8 pages.
    if size < MIN_PARENT_VRAM or size % (8 * GPU_PAGE):
        raise ConfigError(
            f"parent VRAM {size} must be at least {MIN_PARENT_VRAM >> 20} MiB "
            f"and a multiple of {8 * GPU_PAGE} bytes"
        )
    return size
