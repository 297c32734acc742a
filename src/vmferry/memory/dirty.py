"""Dirty bitmaps (KVM's layout: bit k of 64-bit word k/64 is page k) and page runs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class DirtyBitmap:
    """One bit per page, in KVM's layout, so KVM can fill it directly."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.words: npt.NDArray[np.uint64] = np.zeros((npages + 63) // 64, dtype=np.uint64)

    def clear(self) -> None:
        self.words[:] = 0

    def set_all(self) -> None:
        self.words[:] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        tail = self.npages % 64
        if tail:
            self.words[-1] = np.uint64((1 << tail) - 1)

    def set_pages(self, pages: npt.NDArray[np.integer]) -> None:
        p = np.asarray(pages, dtype=np.uint64)
        # bitwise_or.at accumulates correctly when several pages share a word.
        np.bitwise_or.at(self.words, p >> np.uint64(6), np.uint64(1) << (p & np.uint64(63)))

    def set_range(self, first: int, count: int) -> None:
        self.set_pages(np.arange(first, first + count, dtype=np.uint64))

    def merge(self, other: DirtyBitmap) -> None:
        np.bitwise_or(self.words, other.words, out=self.words)

    def count(self) -> int:
        return int(np.bitwise_count(self.words).sum())

    def pages(self) -> npt.NDArray[np.int64]:
        """Sorted indices of set pages. Only non-zero words are unpacked."""
        nz = np.flatnonzero(self.words)
        if nz.size == 0:
            return np.zeros(0, dtype=np.int64)
        bits = np.unpackbits(self.words[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
        row, col = np.nonzero(bits)
        return (nz[row].astype(np.int64) << 6) + col

    def __contains__(self, page: int) -> bool:
        return bool((int(self.words[page >> 6]) >> (page & 63)) & 1)


def page_runs(
    pages: npt.NDArray[np.integer],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Split sorted page indices into runs of consecutive pages: (starts, lengths)."""
    p = np.asarray(pages, dtype=np.int64)
    if p.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts_idx = np.concatenate(([0], breaks))
    ends_idx = np.concatenate((breaks, [p.size]))
    return p[starts_idx], ends_idx - starts_idx
