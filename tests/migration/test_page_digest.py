"""The page digest (verify.py) that the source, the landing digests and the audit share:
any one changed word, and the two-word changes a 64-bit-word digest misses (the sign bits
of two doubles), change it."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.verify import BLOCK_PAGES, digest_rows, page_digests, page_keys

SEEDS = range(8)


def _page(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, size=(1, 512), dtype=np.uint64)


def test_negating_two_doubles_in_a_page_changes_its_digest() -> None:
    for seed in SEEDS:
        page = np.random.default_rng(seed).standard_normal((1, 512)).view(np.uint64)
        other = page.view(np.float64).copy()
        other[0, 5] = -other[0, 5]
        other[0, 300] = -other[0, 300]
        keys = page_keys(seed)
        assert digest_rows(other.view(np.uint64), keys)[0] != digest_rows(page, keys)[0]


def test_flipping_bit_63_of_two_words_changes_the_digest() -> None:
    for seed in SEEDS:
        page, keys = _page(seed), page_keys(seed)
        other = page.copy()
        other[0, [17, 400]] ^= np.uint64(1 << 63)
        assert digest_rows(other, keys)[0] != digest_rows(page, keys)[0]


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    word=st.integers(0, 511),
    old=st.integers(0, 2**64 - 1),
    new=st.integers(0, 2**64 - 1),
)
def test_any_single_changed_word_changes_the_digest(
    seed: int, word: int, old: int, new: int
) -> None:
    page = _page(seed)
    page[0, word], other = np.uint64(old), page.copy()
    other[0, word] = np.uint64(new)
    keys = page_keys(seed)
    assert (digest_rows(other, keys)[0] == digest_rows(page, keys)[0]) == (old == new)


def test_blocks_threads_and_gathers_give_each_page_the_same_digest() -> None:
    n = 3 * BLOCK_PAGES + 5
    mem = GuestMemory(4 << 20)  # 1024 pages
    try:
        rng = np.random.default_rng(2)
        mem.pages()[:n] = rng.integers(0, 2**64, size=(n, 512), dtype=np.uint64)
        keys = page_keys(3)
        one_by_one = np.array([digest_rows(mem.pages()[p : p + 1], keys)[0] for p in range(n)])
        assert np.array_equal(digest_rows(mem.pages()[:n], keys), one_by_one)
        scattered = np.arange(0, n, 3, dtype=np.int64)
        assert np.array_equal(page_digests(mem, scattered, 3), one_by_one[scattered])
        assert not digest_rows(np.zeros((2, 512), dtype=np.uint64), keys).any()  # zero → 0
    finally:
        mem.close()
