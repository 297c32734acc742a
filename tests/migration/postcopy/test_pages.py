"""Post-copy's page records against a plain set of pages: range queries, run updates,
the sent record's takes (never a page twice) and its wrap-around cursor."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.migration.postcopy.pages import PresentPages, SentPages, clip_runs

NPAGES = st.integers(1, 300)


def _pages(runs: tuple[np.ndarray, np.ndarray]) -> list[int]:
    return [
        p for a, n in zip(runs[0].tolist(), runs[1].tolist(), strict=True) for p in range(a, a + n)
    ]


@st.composite
def record_and_marks(draw: st.DrawFn) -> tuple[int, set[int]]:
    n = draw(NPAGES)
    return n, set(draw(st.lists(st.integers(0, n - 1), max_size=n)))


@settings(max_examples=150, deadline=None)
@given(record_and_marks(), st.data())
def test_unset_in_and_holds_match_a_set(rm: tuple[int, set[int]], data: st.DataObject) -> None:
    n, marked = rm
    rec = PresentPages(n)
    rec.bitmap.set_pages(np.array(sorted(marked), dtype=np.int64))
    first = data.draw(st.integers(0, n))
    count = data.draw(st.integers(0, n - first))
    want = [p for p in range(first, first + count) if p not in marked]
    assert _pages(rec.unset_in(first, count)) == want
    assert rec.holds(first, count) == (not want)
    assert rec.count() == len(marked)


@settings(max_examples=100, deadline=None)
@given(record_and_marks(), st.integers(1, 40), st.data())
def test_take_returns_each_unsent_page_once_in_bounded_runs(
    rm: tuple[int, set[int]], limit: int, data: st.DataObject
) -> None:
    n, sent = rm
    rec = SentPages(n)
    rec.bitmap.set_pages(np.array(sorted(sent), dtype=np.int64))
    first = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(1, n - first))
    runs = rec.take(first, count, limit)
    assert int(runs[1].max(initial=0)) <= limit
    assert _pages(runs) == [p for p in range(first, first + count) if p not in sent]
    assert rec.take(first, count, limit)[0].size == 0, "a page taken twice"


@settings(max_examples=100, deadline=None)
@given(record_and_marks(), st.integers(1, 70), st.data())
def test_take_next_walks_from_the_cursor_then_wraps_and_covers_every_page_once(
    rm: tuple[int, set[int]], limit: int, data: st.DataObject
) -> None:
    n, sent = rm
    rec = SentPages(n)
    rec.bitmap.set_pages(np.array(sorted(sent), dtype=np.int64))
    cursor = data.draw(st.integers(0, n + 5))
    unsent = [p for p in range(n) if p not in sent]
    ahead = [p for p in unsent if p >= cursor] or unsent
    order: list[int] = []
    while True:
        runs = rec.take_next(cursor, limit)
        if runs[0].size == 0:
            break
        assert runs[0].size == 1 and 1 <= int(runs[1][0]) <= limit
        order += _pages(runs)
        cursor = int(runs[0][0] + runs[1][0])
    assert sorted(order) == unsent and len(set(order)) == len(order)
    assert rec.complete
    if unsent:
        assert order[0] == ahead[0], "the push starts at the first unsent page from the cursor"


def test_take_next_starts_at_the_cursor_and_skips_what_was_sent() -> None:
    rec = SentPages(200)
    rec.mark_range(100, 5)
    runs = rec.take_next(98, 16)
    assert _pages(runs) == [98, 99], "the run stops at the first sent page"
    assert _pages(rec.take_next(100, 16)) == list(range(105, 121))
    rec.mark_range(121, 79)
    assert _pages(rec.take_next(150, 4)) == [0, 1, 2, 3], "past the end it wraps to page 0"


def test_clip_runs_splits_long_runs_only() -> None:
    runs = (np.array([0, 40, 100]), np.array([35, 3, 16]))
    first, n = clip_runs(runs, 16)
    assert first.tolist() == [0, 16, 32, 40, 100] and n.tolist() == [16, 16, 3, 3, 16]
