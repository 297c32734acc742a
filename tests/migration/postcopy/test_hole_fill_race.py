"""A hole (a zero page the destination holds no page of) is not present until its zeros
are in: a second DMA, or a DMA racing a vCPU's fault, on a hole another thread is
filling waits for that fill instead of touching the page early (with the GIL held, a
touch of a missing page stops the whole process) and asks the source nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.migration.postcopy.harness import (
    MiB,
    Pair,
    Toucher,
    connect,
    make_pair,
    uffd_unavailable,
)
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.postcopy.fault_server import FaultServer

pytestmark = pytest.mark.skipif(
    (why := uffd_unavailable()) is not None, reason=f"no userfaultfd here: {why}"
)
SIZE = 4 * MiB
FIRST, N = 64, 32  # the holes
FILL_S = 0.3  # a fill preempted this long between its claim and its COPY


class SlowFill:
    """Wraps the server's zeropage: the first fill is held back, as a GIL switch would."""

    def __init__(self, fs: FaultServer) -> None:
        self.real = fs.uf.zeropage
        self.started = threading.Event()
        self.done = threading.Event()
        fs.uf.zeropage = self  # type: ignore[method-assign]

    def __call__(self, dst: int, length: int, *, wake: bool = True) -> int:
        self.started.set()
        time.sleep(FILL_S)
        n = self.real(dst, length, wake=wake)
        self.done.set()
        return n


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = make_pair(SIZE)
    yield p
    p.close()


def _holes(pair: Pair) -> tuple[FaultServer, SlowFill]:
    ps, fs, _ = connect(pair, channels=2)
    fs.holes.mark_range(FIRST, N)  # zero, not owed: never sent, not present
    ps.sent.mark_range(FIRST, N)
    slow = SlowFill(fs)
    fs.start()
    ps.start()
    return fs, slow


def test_a_second_dma_on_a_hole_waits_for_the_first_ones_fill(pair: Pair) -> None:
    fs, slow = _holes(pair)
    off = (FIRST + 3) * PAGE_SIZE
    first = threading.Thread(target=fs.fetch, args=(off, 2 * PAGE_SIZE, 5.0), daemon=True)
    pair.threads.append(first)
    first.start()
    assert slow.started.wait(5), "the first DMA never filled its hole"
    assert not fs.present.holds(FIRST + 3, 1), "a hole is present before its zeros are in"
    assert fs.fetch(off + 100, PAGE_SIZE, 5.0)
    assert slow.done.is_set(), "the second DMA went on before the hole was filled"
    first.join(5)
    reader = Toucher(pair.dest, [off, off + PAGE_SIZE])
    reader.start()
    reader.join(5)
    assert reader.got == [bytes(64)] * 2
    assert fs.requests_sent == 0 and fs.zero_filled == 2 and fs.error is None


def test_a_vcpu_fault_on_a_hole_a_dma_is_filling_waits_for_that_fill(pair: Pair) -> None:
    fs, slow = _holes(pair)
    off = (FIRST + 10) * PAGE_SIZE
    dma = threading.Thread(target=fs.fetch, args=(off, PAGE_SIZE, 5.0), daemon=True)
    pair.threads.append(dma)
    dma.start()
    assert slow.started.wait(5)
    toucher = Toucher(pair.dest, [off + 64])  # faults while the DMA's fill is held back
    pair.threads.append(toucher)
    toucher.start()
    toucher.join(5)
    dma.join(5)
    assert not toucher.is_alive() and toucher.got == [bytes(64)]
    assert fs.requests_sent == 0, "a hole being filled here was asked of the source"
    assert fs.zero_filled == 1 and fs.error is None


def test_untouched_holes_do_not_keep_post_copy_from_completing(pair: Pair) -> None:
    ps, fs, _ = connect(pair, channels=2)
    fs.holes.mark_range(FIRST, N)
    ps.sent.mark_range(FIRST, N)
    fs.start()
    ps.start()
    assert fs.wait_complete(10) and fs.error is None
    assert fs.present.count() == SIZE // PAGE_SIZE - N and fs.zero_filled == 0
