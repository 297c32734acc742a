"""A page the destination counts as present but holds no page of its memfd (pre-copy
sent it as a zero page and nothing pre-faulted it) faults like a missing one once RAM is
registered: the fault server fills it with zeros itself — for a vCPU's touch and before
a DMA touches it — and asks the source nothing. It is present once filled."""

from __future__ import annotations

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
from vmferry.devices.iommu import DirtyTracking, Iommu
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.postcopy.iommu_gate import DmaPageGate, GatedDma

pytestmark = pytest.mark.skipif(
    (why := uffd_unavailable()) is not None, reason=f"no userfaultfd here: {why}"
)
SIZE = 8 * MiB
HOLES = (2 * MiB // PAGE_SIZE, 256)  # 1 MiB of zero pages the destination never wrote


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = make_pair(SIZE)
    yield p
    p.close()


def test_touches_and_dma_on_holes_read_zeros_without_asking_the_source(pair: Pair) -> None:
    first, n = HOLES
    lo = first * PAGE_SIZE
    offsets = [lo + 64 * i for i in range(0, n * PAGE_SIZE // 64, 997)]
    toucher = Toucher(pair.dest, offsets)
    pair.threads.append(toucher)
    toucher.start()  # waits in the userfaultfd's queue until the server reads it
    ps, fs, _ = connect(pair, channels=2, max_bandwidth=1e6)  # the push barely moves
    fs.holes.mark_range(first, n)  # as the switch says: zero, not owed, not present yet
    ps.sent.mark_range(first, n)
    fs.start()
    ps.start()
    toucher.join(10)
    assert not toucher.is_alive(), f"a touch of a hole never returned: {fs.error!r}"
    assert toucher.got == [bytes(64)] * len(offsets)
    dma = GatedDma(Iommu(pair.dest, DirtyTracking.NONE), DmaPageGate(fs, timeout_s=10))
    span = (lo + (n - 3) * PAGE_SIZE + 100, 2 * PAGE_SIZE)  # the last holes, not yet touched
    assert dma.read(*span).tobytes() == bytes(span[1])
    assert fs.requests_sent == 0 and ps.served.requests == 0, "the source was asked for zeros"
    assert 0 < fs.zero_filled <= n and fs.error is None
    assert fs.present.count() == fs.zero_filled + fs.landing.received, "what was filled, or landed"
