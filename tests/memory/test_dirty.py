from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vmferry.memory import DirtyBitmap, page_runs


@given(
    st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1))))
)
def test_bitmap_holds_exactly_the_pages_set(args: tuple[int, set[int]]) -> None:
    npages, pages = args
    b = DirtyBitmap(npages)
    b.set_pages(np.array(sorted(pages), dtype=np.int64))
    assert b.pages().tolist() == sorted(pages)
    assert b.count() == len(pages)
    assert all(p in b for p in list(pages)[:20])


@given(st.sets(st.integers(0, 10_000)))
def test_page_runs_cover_the_pages_with_maximal_runs(pages: set[int]) -> None:
    p = np.array(sorted(pages), dtype=np.int64)
    starts, lengths = page_runs(p)
    rebuilt = [
        s + i for s, n in zip(starts.tolist(), lengths.tolist(), strict=True) for i in range(n)
    ]
    assert rebuilt == sorted(pages)
    # Maximal: no run ends where the next one starts.
    assert all(s1 + n1 < s2 for s1, n1, s2 in zip(starts, lengths, starts[1:], strict=False))


def test_set_all_respects_the_tail() -> None:
    b = DirtyBitmap(100)
    b.set_all()
    assert b.count() == 100
    assert b.pages()[-1] == 99


def test_merge_is_union() -> None:
    a, b = DirtyBitmap(200), DirtyBitmap(200)
    a.set_range(0, 10)
    b.set_range(5, 10)
    a.merge(b)
    assert a.pages().tolist() == list(range(15))
