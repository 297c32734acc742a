"""Post-copy's discard at the destination (in the downtime): only the owed pages the
memfd holds are punched, in the fewest fallocate calls — runs merge across pages that
are holes already, never across a held page that is not owed — and the runs come from
bitmap words, not page lists."""

from __future__ import annotations

import numpy as np

from vmferry.memory.dirty import DirtyBitmap, page_runs
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.migration.postcopy.destination_side import discard_owed
from vmferry.migration.postcopy.pages import punch_runs, word_runs

NPAGES = 4096


def _bitmap(pages: np.ndarray) -> DirtyBitmap:
    return DirtyBitmap.from_pages(NPAGES, pages.astype(np.int64))


def test_word_runs_are_the_runs_of_the_set_pages() -> None:
    rng = np.random.default_rng(5)
    for density in (0.01, 0.5, 0.97):
        pages = np.flatnonzero(rng.random(NPAGES) < density)
        pages = np.union1d(pages, [62, 63, 64, 127, NPAGES - 1])  # across words, the end
        got = word_runs(_bitmap(pages).words)
        want = page_runs(pages)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert word_runs(DirtyBitmap(NPAGES).words)[0].size == 0


def test_punch_runs_merge_across_holes_never_across_held_pages() -> None:
    held = np.r_[0:100, 1000:1100]
    owed = np.arange(0, 2001, 2)
    resident, due = _bitmap(held), _bitmap(owed)
    starts, lengths = punch_runs(due.words & resident.words, due.words | ~resident.words)
    covered = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lengths, strict=True)])
    must = np.intersect1d(held, owed)
    assert np.isin(must, covered).all(), "an owed page held here was left"
    assert not np.isin(np.setdiff1d(held, owed), covered).any(), "a held page not owed went"
    # 50 + 49 lone owed pages among held ones, and one run from 100 across holes to 1000;
    # the holes past 1100 hold nothing to punch.
    runs = zip(starts.tolist(), lengths.tolist(), strict=True)
    assert starts.size == 100 and (100, 901) in runs


def test_discard_owed_punches_only_owed_pages_held_here_in_merged_calls() -> None:
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    try:
        held = np.r_[0:100, 1000:1100, 3000:3001]
        mem.bytes[held * PAGE_SIZE] = 7
        owed = _bitmap(np.arange(0, 2001, 2))
        before = mem.resident_bitmap()
        calls = discard_owed(mem, owed.words, before.words)
        after = mem.resident_bitmap()
        assert np.array_equal(after.words, before.words & ~owed.words)
        assert calls == 100, "one fallocate per owed run (1001) instead of merged runs"
        assert int(mem.bytes[3000 * PAGE_SIZE]) == 7 and int(mem.bytes[1001 * PAGE_SIZE]) == 7
    finally:
        mem.close()
