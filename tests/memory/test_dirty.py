from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.memory import DirtyBitmap, page_runs
from vmferry.memory.dirty import ONES


@given(
    st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1))))
)
def test_bitmap_holds_exactly_the_pages_set(args: tuple[int, set[int]]) -> None:
    npages, pages = args
    b = DirtyBitmap(npages)
    b.set_pages(np.array(sorted(pages), dtype=np.int64))
    assert b.pages().tolist() == sorted(pages)
    assert b.count() == len(pages)


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


# ---- word-level operations agree with the index-array versions


def _sets(max_pages: int = 3000) -> st.SearchStrategy[tuple[int, list[int]]]:
    """A bitmap size and sorted pages in it, dense or sparse, with runs across words."""
    return st.integers(1, max_pages).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.one_of(
                st.sets(st.integers(0, n - 1)),
                st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 300))).map(
                    lambda rs: {p for s, k in rs for p in range(s, min(s + k, n))}
                ),
            ).map(sorted),
        )
    )


def _bitmap(n: int, pages: list[int]) -> DirtyBitmap:
    return DirtyBitmap.from_pages(n, np.array(pages, dtype=np.int64))


@given(_sets(), st.data())
def test_pages_of_a_word_range_are_its_slice(
    args: tuple[int, list[int]], data: st.DataObject
) -> None:
    n, pages = args
    b = _bitmap(n, pages)
    w0 = data.draw(st.integers(0, b.words.size))
    w1 = data.draw(st.integers(w0, b.words.size))
    inside = [p for p in pages if w0 * 64 <= p < w1 * 64]
    assert b.pages(w0, w1).tolist() == inside
    assert b.count(w0, w1) == len(inside)


@given(_sets(), _sets())
def test_set_runs_and_clear_runs_are_union_and_difference(
    a: tuple[int, list[int]], b: tuple[int, list[int]]
) -> None:
    n = max(a[0], b[0])
    mine = _bitmap(n, a[1])
    starts, lengths = page_runs(np.array(b[1], dtype=np.int64))
    mine.set_runs(starts, lengths)
    assert mine.pages().tolist() == sorted(set(a[1]) | set(b[1]))
    mine = _bitmap(n, a[1])
    mine.clear_runs(starts, lengths)
    assert mine.pages().tolist() == sorted(set(a[1]) - set(b[1]))


@given(st.lists(st.integers(0, 4999), max_size=400))
def test_set_pages_takes_unsorted_pages_with_repeats(pages: list[int]) -> None:
    b = DirtyBitmap(5000)
    b.set_pages(np.array(pages, dtype=np.int64))
    assert b.pages().tolist() == sorted(set(pages))


@given(_sets(), st.integers(1, 300))
def test_batches_cover_every_page_once_within_the_limit(
    args: tuple[int, list[int]], max_pages: int
) -> None:
    n, pages = args
    b = _bitmap(n, pages)
    ranges = b.batches(max_pages)
    got = [p for w0, w1 in ranges for p in b.pages(w0, w1).tolist()]
    assert got == pages
    assert all(w0 < w1 for w0, w1 in ranges)
    assert all(b.count(w0, w1) < max_pages + 64 for w0, w1 in ranges)
    # the first max_pages pages go in the first batch, as they would from a page list
    assert ranges == [] or b.count(*ranges[0]) >= min(max_pages, len(pages))
    assert all(a1 <= b0 for (_, a1), (b0, _) in itertools.pairwise(ranges))


@given(_sets(), st.integers(1, 5), st.integers(1, 16))
def test_split_blocks_is_split_by_block_of_the_pages(
    args: tuple[int, list[int]], n: int, block_words: int
) -> None:
    npages, pages = args
    p = np.array(pages, dtype=np.int64)
    parts = _bitmap(npages, pages).split_blocks(block_words, n)
    owner = (p // (64 * block_words)) % n
    assert [b.pages().tolist() for b in parts] == [p[owner == c].tolist() for c in range(n)]


@given(_sets(600), st.integers(0, 700), st.integers(0, 2000))
def test_merge_at_adds_a_log_at_any_page_offset(
    log: tuple[int, list[int]], first: int, base_seed: int
) -> None:
    nlog, logged = log
    into = DirtyBitmap(first + nlog + base_seed % 200)
    rng = np.random.default_rng(base_seed)
    before = sorted({int(x) for x in rng.integers(0, into.npages, size=20)})
    into.set_pages(np.array(before, dtype=np.int64))
    words = _bitmap(nlog, logged).words.copy()
    if nlog % 64:
        words[-1] |= ~np.uint64((1 << (nlog % 64)) - 1)  # bits past the log's end: ignored
    into.merge_at(first, words, nlog)
    assert into.pages().tolist() == sorted(set(before) | {first + q for q in logged})


@given(st.lists(st.tuples(st.integers(0, 2999), st.integers(0, 200)), max_size=40), _sets())
def test_runs_in_any_order_and_overlapping_set_and_clear_their_pages(
    runs: list[tuple[int, int]], base: tuple[int, list[int]]
) -> None:
    runs = [(s, min(k, 3000 - s)) for s, k in runs]
    starts = np.array([s for s, _ in runs], dtype=np.int64)
    lengths = np.array([k for _, k in runs], dtype=np.int64)
    covered = {p for s, k in runs for p in range(s, s + k)}
    b = _bitmap(3000, base[1])
    b.set_runs(starts, lengths)
    assert b.pages().tolist() == sorted(set(base[1]) | covered)
    b.clear_runs(starts, lengths)
    assert b.pages().tolist() == sorted(set(base[1]) - covered)


@pytest.mark.parametrize(("first", "npages"), [(90, 20), (64, 100), (99, 1), (100, 5), (36, 64)])
def test_merge_at_leaves_out_pages_past_the_end(first: int, npages: int) -> None:
    b = DirtyBitmap(100)
    b.merge_at(first, np.full((npages + 63) // 64, ONES, dtype=np.uint64), npages)
    want = list(range(first, min(first + npages, 100)))
    assert b.pages().tolist() == want and b.count() == len(want)
    assert int(b.words[-1]) >> (100 % 64) == 0  # the spare bits stay clear


@given(
    st.integers(1, 3000).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.sets(st.integers(0, n - 1)),
            st.lists(st.integers(0, n - 1), max_size=200),
        )
    )
)
def test_test_says_which_pages_are_set_in_the_order_asked(
    args: tuple[int, set[int], list[int]],
) -> None:
    npages, set_, asked = args
    b = DirtyBitmap.from_pages(npages, np.array(sorted(set_), dtype=np.int64))
    got = b.test(np.array(asked, dtype=np.int64))
    assert got.dtype == np.bool_
    assert got.tolist() == [p in set_ for p in asked]
