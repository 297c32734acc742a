"""The bytes the migration bench fills guest RAM with, and whether two guests fit.

Both VMMs get the same data: QEMU maps a /dev/shm file written with it as its RAM, and
the vmferry source writes it straight into its own RAM (no file, so an 8 GiB guest costs
8 GiB once, not twice). The data is incompressible and deterministic: one random 64 MiB
block XORed with a key per 64 MiB chunk, so no two pages are alike, at one numpy
operation per chunk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vmferry.memory.guest_memory import GuestMemory

FILL_START = 32 << 20  # host-made data from here up; the guest's image and wss lie below
FILL_SEED = 11
CHUNK = 64 << 20
GIB = 1 << 30
# Kept free besides the guests: the bench's own processes, page cache, other work.
MARGIN = 2 * GIB


def fill_words(
    words: npt.NDArray[np.uint64], start: int = FILL_START, seed: int = FILL_SEED
) -> None:
    """Fill RAM seen as 64-bit words (offset 0 first) from byte ``start`` up."""
    block = np.frombuffer(np.random.default_rng(seed).bytes(CHUNK), dtype=np.uint64)
    size = words.size * 8
    for i, off in enumerate(range(start, size, CHUNK)):
        n = min(CHUNK, size - off) // 8
        key = np.uint64((0x9E3779B97F4A7C15 * (i + 1)) & (2**64 - 1))
        np.bitwise_xor(block[:n], key, out=words[off // 8 : off // 8 + n])


def fill_memory(memory: GuestMemory) -> None:
    fill_words(memory.bytes.view(np.uint64))


def write_fill_file(path: Path, size: int) -> None:
    """A RAM image for QEMU's ``memory-backend-file``: zero below FILL_START, then the
    fill. Removed again if writing it fails."""
    path.unlink(missing_ok=True)
    try:
        mm = np.memmap(path, dtype=np.uint64, mode="w+", shape=(size // 8,))
        try:
            fill_words(mm)
            mm.flush()
        finally:
            del mm
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def available_memory() -> int:
    """MemAvailable in bytes (0 when it cannot be read)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fits(memory: int, available: int, copies: int = 2, margin: int = MARGIN) -> bool:
    """Whether ``copies`` guests of ``memory`` bytes (a source and a destination) fit in
    ``available`` bytes with ``margin`` to spare."""
    return copies * memory + margin <= available


__all__ = [
    "FILL_START",
    "available_memory",
    "fill_memory",
    "fill_words",
    "fits",
    "write_fill_file",
]
