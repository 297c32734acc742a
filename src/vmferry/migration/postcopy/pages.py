"""Post-copy's page records, as bitmaps operated on by runs (never page by page).

The destination keeps which pages it holds (``PresentPages``: set once a page's UFFDIO_COPY
is done) and which it has asked for; the source keeps which pages it has sent
(``SentPages``), so that no page goes twice, whether a request or the background stream
reaches it first. Both are ``DirtyBitmap``s in KVM's layout; a range is read a few u64
words at a time, unpacked with numpy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmferry.memory.dirty import DirtyBitmap, IntArray, Words, page_runs

Bits = npt.NDArray[np.bool_]
Runs = tuple[IntArray, IntArray]  # (first pages, page counts), sorted, disjoint


def _no_runs() -> Runs:
    empty = np.zeros(0, dtype=np.int64)
    return empty, empty


def range_bits(bitmap: DirtyBitmap, first: int, count: int) -> Bits:
    """Bits [first, first+count) of ``bitmap`` as a bool array (only the words they use)."""
    w0, w1 = first >> 6, (first + count + 63) >> 6
    raw = np.ascontiguousarray(bitmap.words[w0:w1]).view(np.uint8)
    bits: Bits = np.unpackbits(raw, bitorder="little").astype(bool)
    lo = first - (w0 << 6)
    return bits[lo : lo + count]


def runs_where(bits: Bits, first: int) -> Runs:
    """Runs of True in ``bits``, numbered from page ``first``."""
    idx = np.flatnonzero(bits)
    if idx.size == 0:
        return _no_runs()
    starts, lengths = page_runs(idx)
    return starts + first, lengths


def clip_runs(runs: Runs, max_pages: int) -> Runs:
    """Runs cut into pieces of at most ``max_pages`` pages (one record or COPY each)."""
    starts, lengths = runs
    if starts.size == 0 or int(lengths.max()) <= max_pages:
        return runs
    pieces = -(-lengths // max_pages)
    owner = np.repeat(np.arange(starts.size), pieces)
    kth = np.arange(owner.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    first = starts[owner] + kth * max_pages
    n = np.minimum(max_pages, starts[owner] + lengths[owner] - first)
    return first, n


def set_bits(words: Words) -> IntArray:
    """The positions of the set bits of a bitmap's words (work per non-zero word)."""
    nz = np.flatnonzero(words)
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
    w, b = np.nonzero(bits)
    out: IntArray = (nz[w] << 6) + b
    return out


def word_runs(words: Words) -> Runs:
    """Runs of set bits of a bitmap, from its words: its edges are found word-wide (a
    bit and the one before it), so the work is per word and per run, never per page."""
    if words.size == 0:
        return _no_runs()
    before = words << np.uint64(1)  # bit i: bit i-1, the word below's top bit carried in
    before[1:] |= words[:-1] >> np.uint64(63)
    starts = set_bits(words & ~before)
    ends = set_bits(~words & before)
    if int(words[-1]) >> 63:
        ends = np.append(ends, words.size << 6)
    return starts, ends - starts


def punch_runs(must: Words, may: Words) -> Runs:
    """The fewest runs that cover every page of ``must`` and only pages of ``may`` (a
    superset: pages a punch would not harm): the runs of ``may`` holding a page of
    ``must``. Post-copy's discard: owed ∩ resident must go, a page already a hole may."""
    starts, lengths = word_runs(may)
    firsts = word_runs(must)[0]
    if firsts.size == 0:
        return _no_runs()
    keep = np.unique(np.searchsorted(starts, firsts, side="right") - 1)
    return starts[keep], lengths[keep]


class PageRecord:
    """One bitmap of pages with range queries and run updates."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.bitmap = DirtyBitmap(npages)

    def _check(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages {first}+{count} are outside 0..{self.npages}")

    def mark(self, runs: Runs) -> None:
        self.bitmap.set_runs(*runs)

    def mark_range(self, first: int, count: int) -> None:
        self._check(first, count)
        self.bitmap.set_range(first, count)

    def holds(self, first: int, count: int) -> bool:
        """Whether every page in [first, first+count) is set."""
        self._check(first, count)
        return count == 0 or bool(range_bits(self.bitmap, first, count).all())

    def unset_in(self, first: int, count: int) -> Runs:
        """Runs of the pages in [first, first+count) not set."""
        self._check(first, count)
        if count == 0:
            return _no_runs()
        return runs_where(~range_bits(self.bitmap, first, count), first)

    def count(self) -> int:
        return self.bitmap.count()

    @property
    def complete(self) -> bool:
        return self.count() == self.npages


class PresentPages(PageRecord):
    """The destination: pages it holds (landed by COPY, or brought by pre-copy)."""


class SentPages(PageRecord):
    """The source: pages it has sent, and where the background stream goes next."""

    def take(self, first: int, count: int, max_pages: int) -> Runs:
        """The unsent pages of [first, first+count), as runs of at most ``max_pages``,
        now marked sent: the caller sends exactly these."""
        runs = clip_runs(self.unset_in(first, count), max_pages)
        self.mark(runs)
        return runs

    def take_next(self, cursor: int, max_pages: int) -> Runs:
        """The first unsent run at or after ``cursor`` (wrapping around to page 0), at
        most ``max_pages`` long, marked sent; no runs once every page is sent."""
        start = self._first_unsent(cursor)
        if start is None:
            start = self._first_unsent(0)
        if start is None:
            return _no_runs()
        n = min(max_pages, self.npages - start)
        bits = ~range_bits(self.bitmap, start, n)
        taken = bits.size if bits.all() else int(np.argmin(bits))  # the unsent prefix
        runs = (np.array([start], np.int64), np.array([taken], np.int64))
        self.mark(runs)
        return runs

    def _first_unsent(self, cursor: int) -> int | None:
        if cursor >= self.npages:
            return None
        words = self.bitmap.words
        w0 = cursor >> 6
        head = int(words[w0]) | ((1 << (cursor & 63)) - 1)  # pages before cursor: "sent"
        if self.npages - (w0 << 6) < 64:
            head |= ~((1 << (self.npages - (w0 << 6))) - 1) & ((1 << 64) - 1)
        if head != (1 << 64) - 1:
            return (w0 << 6) + _lowest_zero(head)
        rest = np.flatnonzero(~words[w0 + 1 :])
        if rest.size == 0:
            return None
        w = w0 + 1 + int(rest[0])
        page = (w << 6) + _lowest_zero(int(words[w]))
        return page if page < self.npages else None


def _lowest_zero(word: int) -> int:
    inv = ~word & ((1 << 64) - 1)
    return (inv & -inv).bit_length() - 1
