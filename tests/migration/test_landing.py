"""The destination's landing digests: each page's digest as it landed (x-verify on), the
same as the source's of the same content, a zero page's and a never-written page's 0."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vmferry.errors import MigrationError, StreamError
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.audit import AuditComparison, source_chunks
from vmferry.migration.landing import LandingDigests
from vmferry.migration.verify import page_digests

NPAGES = 2048


def _runs(*runs: tuple[int, int, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first, n, z = zip(*runs, strict=True)
    return np.array(first, dtype=np.int64), np.array(n, dtype=np.int64), np.array(z)


def test_landing_digests_match_the_sources_and_the_audit_finds_a_stale_page() -> None:
    src, dst = GuestMemory(NPAGES * 4096), GuestMemory(NPAGES * 4096)
    try:
        rng = np.random.default_rng(4)
        src.pages()[:1500] = rng.integers(0, 2**64, size=(1500, 512), dtype=np.uint64)
        dst.pages()[:1500] = src.pages()[:1500]
        landing = LandingDigests(dst, seed=9)
        # long runs (a view each), then scattered short ones (one gather), then zero runs
        landing.landed(*_runs((0, 1000, False), (1000, 200, False)))
        landing.landed(*_runs(*[(p, 1, False) for p in range(1200, 1500, 1)]))
        landing.landed(*_runs((1500, 100, True)))
        landing.drain()
        pages = np.arange(1500, dtype=np.int64)
        assert np.array_equal(landing.digests[:1500], page_digests(src, pages, 9))
        assert not landing.digests[1500:].any()

        comp = AuditComparison(landing)
        assert [comp.take(c) for c, _ in source_chunks(src, 9, 512)] == [False] * 3 + [True]
        assert comp.passed and comp.next_page == NPAGES
        comp = AuditComparison(landing)
        src.pages()[700, 3] ^= np.uint64(1)  # the source has what never arrived
        src.pages()[1800, 0] = np.uint64(7)  # and data where the destination has a hole
        done = [comp.take(c) for c, _ in source_chunks(src, 9, 512)]
        assert done[-1] and not comp.passed
        assert comp.mismatched == [700, 1800] and comp.mismatch_count == 2
        assert comp.detail() == "guest RAM differs from the source's in pages 700, 1800"
        landing.close()
        landing.landed(*_runs((0, 1, False)))  # after close: ignored, the memory may go
    finally:
        src.close()
        dst.close()


def test_chunks_must_come_in_order() -> None:
    mem = GuestMemory(NPAGES * 4096)
    landing = LandingDigests(mem, seed=1)
    try:
        chunks = [c for c, _ in source_chunks(mem, 1, 1024)]
        comp = AuditComparison(landing)
        with pytest.raises(StreamError, match="page 1024 is out of order: page 0 is due"):
            comp.take(chunks[1])
        assert not comp.take(chunks[0]) and comp.take(chunks[1]) and comp.passed
    finally:
        landing.close()
        mem.close()


def test_a_receiver_waits_while_the_worker_is_a_backlog_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker may fall behind by max_backlog data pages: the next landing waits for
    it, so the drain after END stays bounded (zero runs do not count)."""
    mem = GuestMemory(NPAGES * 4096)
    landing = LandingDigests(mem, seed=1)
    go = threading.Event()
    real = landing.digest

    def slow(*runs: np.ndarray) -> None:
        go.wait(10)
        real(*runs)

    monkeypatch.setattr(landing, "digest", slow)
    landing.max_backlog = 100
    try:
        landing.landed(*_runs((0, 80, False), (500, 1000, True)))  # 80 data pages queued
        blocked = threading.Thread(target=landing.landed, args=_runs((100, 30, False)))
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive()  # 80 + 30 > 100: it waits for the worker
        go.set()
        blocked.join(5)
        assert not blocked.is_alive() and landing.waited_s > 0.1
        mem.pages()[200:700] = 1
        landing.landed(*_runs((200, 500, False)))  # alone past the bound: it goes
        landing.drain()
        assert landing.digests[200:700].all()
    finally:
        landing.close()
        mem.close()


def test_a_failed_landing_digest_is_a_migration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    mem = GuestMemory(NPAGES * 4096)
    landing = LandingDigests(mem, seed=1)

    def broken(*runs: np.ndarray) -> None:
        raise ValueError("index 9999 is out of bounds")

    monkeypatch.setattr(landing, "digest", broken)
    try:
        landing.landed(*_runs((0, 8, False)))
        with pytest.raises(MigrationError, match=r"^digesting the landed pages failed: index 9999"):
            landing.drain()
    finally:
        landing.close()
        mem.close()


def test_the_source_audits_in_chunks_of_64_mib_of_ram() -> None:
    """Each chunk is quick to digest (the destination waits x-peer-timeout per message)."""
    mem = GuestMemory(160 << 20)  # 40960 pages
    try:
        mem.pages()[20000] = 3
        chunks = [c for c, _ in source_chunks(mem, 1)]
        assert [(c.first, c.digests.size, c.last) for c in chunks] == [
            (0, 16384, False),
            (16384, 16384, False),
            (32768, 8192, True),
        ]
        assert [int(np.count_nonzero(c.digests)) for c in chunks] == [0, 1, 0]
    finally:
        mem.close()
