"""Dirty bitmaps (KVM's layout: bit k of 64-bit word k/64 is page k) and page runs.

A dirty set stays in this form from KVM's log to the destination's record of what it holds:
every operation works on whole u64 words (a slice, a popcount, a mask per run), so its cost
follows the words or the runs touched, never the pages one by one.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_ALL = (1 << 64) - 1
# Up to this many runs, a run is set with scalar slices: the arrays for masks would cost
# more (about 60 us of numpy calls per batch of one run).
_FEW_RUNS = 4
_U63 = np.uint64(63)

IntArray = npt.NDArray[np.int64]
Words = npt.NDArray[np.uint64]


class DirtyBitmap:
    """One bit per page, in KVM's layout, so KVM can fill it directly.

    Bits past ``npages`` in the last word are always zero."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.words: Words = np.zeros((npages + 63) // 64, dtype=np.uint64)

    @classmethod
    def from_pages(cls, npages: int, pages: npt.NDArray[np.integer]) -> DirtyBitmap:
        bm = cls(npages)
        bm.set_pages(pages)
        return bm

    def copy(self) -> DirtyBitmap:
        bm = DirtyBitmap(self.npages)
        bm.words[:] = self.words
        return bm

    def clear(self) -> None:
        self.words[:] = 0

    def set_all(self) -> None:
        self.words[:] = ONES
        tail = self.npages % 64
        if tail:
            self.words[-1] = np.uint64((1 << tail) - 1)

    def set_pages(self, pages: npt.NDArray[np.integer]) -> None:
        p = np.asarray(pages, dtype=np.int64)
        if p.size > 1 and np.any(p[1:] < p[:-1]):
            p = np.sort(p)
        _or_masks(self.words, p >> 6, np.uint64(1) << (p & 63).astype(np.uint64))

    def set_range(self, first: int, count: int) -> None:
        one = np.array([first], dtype=np.int64)
        self.set_runs(one, np.array([count], dtype=np.int64))

    def set_runs(self, starts: IntArray, lengths: IntArray) -> None:
        """Set pages [starts[i], starts[i] + lengths[i]) (fastest for sorted, disjoint runs;
        any order and overlaps are right too)."""
        if len(starts) <= _FEW_RUNS:  # a long run or two (dense RAM): no array set-up
            for a, k in zip(np.asarray(starts).tolist(), np.asarray(lengths).tolist(), strict=True):
                self._one_run(a, k, True)
            return
        passes, full = _run_masks(starts, lengths)
        for uw, um in passes:
            self.words[uw] |= um
        self.words[full] = ONES

    def clear_runs(self, starts: IntArray, lengths: IntArray) -> None:
        """Clear pages [starts[i], starts[i] + lengths[i]) (any order, overlaps allowed)."""
        if len(starts) <= _FEW_RUNS:
            for a, k in zip(np.asarray(starts).tolist(), np.asarray(lengths).tolist(), strict=True):
                self._one_run(a, k, False)
            return
        passes, full = _run_masks(starts, lengths)
        for uw, um in passes:
            self.words[uw] &= ~um
        self.words[full] = 0

    def _one_run(self, first: int, count: int, value: bool) -> None:
        if count <= 0:
            return
        last = first + count - 1
        w0, w1 = first >> 6, last >> 6
        head = (_ALL << (first & 63)) & _ALL
        tail = _ALL >> (63 - (last & 63))
        edges = [(w0, head & tail)] if w0 == w1 else [(w0, head), (w1, tail)]
        for w, mask in edges:
            cur = int(self.words[w])
            self.words[w] = np.uint64(cur | mask if value else cur & ~mask & _ALL)
        self.words[w0 + 1 : w1] = ONES if value else 0

    def merge(self, other: DirtyBitmap) -> None:
        np.bitwise_or(self.words, other.words, out=self.words)

    def merge_at(self, first_page: int, log: Words, npages: int) -> None:
        """OR in a log whose bit k is page ``first_page + k`` (k < ``npages``): a device's
        DMA log for one mapping. Word for word when the mapping starts on a 64-page
        boundary; otherwise each word is shifted into place, still vectorised. Pages past
        this bitmap's end are left out (its last word's spare bits stay clear)."""
        if first_page < 0:
            raise ValueError(f"a log at page {first_page}")
        npages = min(npages, self.npages - first_page)
        if npages <= 0:
            return
        nwords = (npages + 63) // 64
        src = np.array(log[:nwords], dtype=np.uint64)
        if npages % 64:
            src[-1] &= np.uint64((1 << (npages % 64)) - 1)
        w0, shift = first_page >> 6, first_page & 63
        if shift:
            # word i's top bits spill into word i + 1
            moved = np.zeros(nwords + 1, dtype=np.uint64)
            moved[:-1] = src << np.uint64(shift)
            moved[1:] |= src >> np.uint64(64 - shift)
            src = moved[: (shift + npages + 63) // 64]
        dst = self.words[w0 : w0 + src.size]
        np.bitwise_or(dst, src[: dst.size], out=dst)

    def test(self, pages: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
        """Whether each of ``pages`` is set, in their order (gathered, vectorised)."""
        return bits_set(self.words, pages)

    def count(self, first_word: int = 0, end_word: int | None = None) -> int:
        return int(np.bitwise_count(self.words[first_word:end_word]).sum())

    def pages(self, first_word: int = 0, end_word: int | None = None) -> IntArray:
        """Sorted indices of set pages. Only non-zero words are unpacked."""
        return _bit_positions(self.words[first_word:end_word]) + (first_word << 6)

    def batches(self, max_pages: int) -> list[tuple[int, int]]:
        """Word ranges [first, end) covering every set page: the i-th batch ends with the
        word that holds set page number ``i * max_pages`` (counting from 0 in page order),
        so the first ``max_pages`` pages are in the first batch as with a page list, and a
        batch holds fewer than ``max_pages + 64`` pages (a word is never split)."""
        nz = np.flatnonzero(self.words)
        if nz.size == 0:
            return []
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        counts = np.bitwise_count(self.words[lo:hi]).astype(np.int64)
        before = np.cumsum(counts) - counts  # set pages in the words ahead of each word
        marks = np.arange(max_pages, int(before[-1] + counts[-1]), max_pages, dtype=np.int64)
        inner = np.searchsorted(before, marks, "left")
        cuts = np.concatenate(([0], inner, [hi - lo])) + lo  # sorted; a repeat: no pages
        cuts = cuts[np.concatenate(([True], cuts[1:] != cuts[:-1]))]
        return list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))

    def split_blocks(self, block_words: int, n: int) -> list[DirtyBitmap]:
        """``n`` bitmaps: the i-th holds the pages of blocks i, i + n, … (a block is
        ``block_words`` words). One bitmap is returned as itself."""
        if n == 1:
            return [self]
        owner = (np.arange(self.words.size) // block_words) % n
        parts = []
        for c in range(n):
            part = DirtyBitmap(self.npages)
            np.copyto(part.words, self.words, where=owner == c)
            parts.append(part)
        return parts


def bits_set(words: Words, pages: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """Whether each of ``pages`` is set in ``words`` (KVM's layout: bit ``p & 63`` of word
    ``p >> 6``); for bitmaps that are bare word arrays, as a device's DMA log."""
    p = np.asarray(pages, dtype=np.int64)
    bits = (words[p >> 6] >> (p & 63).astype(np.uint64)) & np.uint64(1)
    out: npt.NDArray[np.bool_] = bits.astype(bool)
    return out


def _byte_tables() -> tuple[IntArray, IntArray]:
    """Per byte value: how many bits are set, and their positions (row-padded to 8)."""
    pop = np.zeros(256, dtype=np.int64)
    pos = np.zeros(256 * 8, dtype=np.int64)
    for v in range(256):
        bits = [b for b in range(8) if v >> b & 1]
        pop[v] = len(bits)
        pos[v * 8 : v * 8 + len(bits)] = bits
    return pop, pos


_POP8, _POS8 = _byte_tables()


def _bit_positions(words: Words) -> IntArray:
    """Indices of the set bits, through a table per non-zero byte: the work follows the
    set bits and the non-zero bytes, not 64 unpacked bits per word."""
    b = np.ascontiguousarray(words).view(np.uint8)  # little-endian: byte j is bits 8j..8j+7
    nzb = np.flatnonzero(b)
    if nzb.size == 0:
        return np.zeros(0, dtype=np.int64)
    vals = b[nzb].astype(np.int64)
    cnt = _POP8[vals]
    owner = np.repeat(np.arange(nzb.size), cnt)  # the byte each set bit is in
    kth = np.arange(owner.size) - (np.cumsum(cnt) - cnt)[owner]
    return nzb[owner] * 8 + _POS8[vals[owner] * 8 + kth]


def _group_starts(widx: IntArray) -> IntArray:
    """Where each group of equal (sorted) word indices begins."""
    return np.concatenate(([0], np.flatnonzero(widx[1:] != widx[:-1]) + 1))


def _grouped(widx: IntArray, masks: Words) -> tuple[IntArray, Words]:
    """Each word index once, with the OR of its masks (``reduceat`` over equal indices),
    so a repeated index is one store, not a lost update."""
    if widx.size == 0:
        return widx, masks
    if np.any(widx[1:] < widx[:-1]):  # runs out of order or overlapping: sort them first
        order = np.argsort(widx, kind="stable")
        widx, masks = widx[order], masks[order]
    first = _group_starts(widx)
    return widx[first], np.bitwise_or.reduceat(masks, first)


def _or_masks(words: Words, widx: IntArray, masks: Words) -> None:
    """words[widx[i]] |= masks[i], for any order of ``widx``."""
    uw, um = _grouped(widx, masks)
    words[uw] |= um


def _run_masks(
    starts: IntArray, lengths: IntArray
) -> tuple[list[tuple[IntArray, Words]], IntArray]:
    """Masks for the first and last word of each run, as passes that each name a word at
    most once (so a fancy-index store loses nothing), and the words runs cover whole.

    Sorted, disjoint runs need no sort: runs within one word are grouped (``reduceat``),
    and the first and last words of runs that span words are distinct among themselves."""
    s = np.asarray(starts, dtype=np.int64)
    n = np.asarray(lengths, dtype=np.int64)
    keep = n > 0
    s, n = s[keep], n[keep]
    last = s + n - 1
    w0, w1 = s >> 6, last >> 6
    head = ONES << (s & 63).astype(np.uint64)
    tail = ONES >> (_U63 - (last & 63).astype(np.uint64))
    one_word = w0 == w1
    inner = w1 - w0 - 1
    wide = inner > 0
    full = expand_runs(w0[wide] + 1, inner[wide])
    if s.size > 1 and np.any(s[1:] <= last[:-1]):  # out of order or overlapping
        head = np.where(one_word, head & tail, head)
        tail = np.where(one_word, head, tail)
        widx = np.stack((w0, w1), axis=1).ravel()
        masks = np.stack((head, tail), axis=1).ravel()
        return [_grouped(widx, masks)], full
    passes = [_grouped(w0[one_word], (head & tail)[one_word])]
    spans = ~one_word
    if spans.any():
        passes += [(w0[spans], head[spans]), (w1[spans], tail[spans])]
    return passes, full


def expand_runs(first: IntArray, npages: IntArray) -> IntArray:
    """[first_i, first_i + npages_i) for every run, concatenated, vectorised."""
    total = int(npages.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(npages) - npages, npages)
    return np.repeat(first, npages) + (np.arange(total, dtype=np.int64) - offsets)


def page_runs(
    pages: npt.NDArray[np.integer],
) -> tuple[IntArray, IntArray]:
    """Split sorted page indices into runs of consecutive pages: (starts, lengths)."""
    p = np.asarray(pages, dtype=np.int64)
    if p.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts_idx = np.concatenate(([0], breaks))
    ends_idx = np.concatenate((breaks, [p.size]))
    return p[starts_idx], ends_idx - starts_idx
