"""Post-copy's data path end to end over socket pairs: threads touching missing pages read
the source's bytes, a DMA waits behind the gate, the background push lands every page
exactly once, blocktime is accounted; a request outside RAM and a malformed page run are
each refused with one clear error, and nobody is left waiting."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
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
from vmferry.migration.postcopy.fault_server import FaultServerError
from vmferry.migration.postcopy.iommu_gate import DmaPageGate, GatedDma
from vmferry.migration.postcopy.page_requests import REQUEST, REQUEST_MAGIC, RUN, RUN_MAGIC
from vmferry.migration.postcopy.page_server import PageServerError
from vmferry.migration.transport import FdSink, FdSource

pytestmark = pytest.mark.skipif(
    (why := uffd_unavailable()) is not None, reason=f"no userfaultfd here: {why}"
)
SIZE = 8 * MiB
NPAGES = SIZE // PAGE_SIZE


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = make_pair(SIZE)
    yield p
    p.close()


@pytest.mark.parametrize("channels", [1, 2])
def test_touches_and_dma_read_the_source_and_every_page_lands_once(
    pair: Pair, channels: int
) -> None:
    rng = np.random.default_rng(7)
    offsets = [rng.integers(0, SIZE - 64, 40).tolist() for _ in range(2)]
    touchers = [Toucher(pair.dest, o) for o in offsets]
    pair.threads += touchers
    for t in touchers:
        t.start()  # its first touch waits in the userfaultfd's queue until it is read
    vcpus = tuple(t.native_id or 0 for t in touchers)
    # The push takes ~0.5 s at 16 MB/s, so most touches find their page missing.
    ps, fs, _ = connect(pair, channels=channels, vcpus=vcpus, max_bandwidth=16e6)
    landed = np.zeros(SIZE, np.uint8)
    fs.on_landed = lambda first, data: landed.__setitem__(  # as the audit's digests would
        slice(first * PAGE_SIZE, first * PAGE_SIZE + len(data)), np.frombuffer(data, np.uint8)
    )
    fs.start()
    ps.start()
    dma = GatedDma(Iommu(pair.dest, DirtyTracking.NONE), gate := DmaPageGate(fs, timeout_s=10))
    span = (5 * MiB - 100, 3 * PAGE_SIZE)  # crosses into three pages
    assert dma.read(*span).tobytes() == pair.source.read_gpa(*span)
    written = np.full(PAGE_SIZE, 0xA5, np.uint8)
    dma.write(6 * MiB, written)  # into a page not yet pushed: it is fetched first
    for t in touchers:
        t.join(10)
        assert not t.is_alive(), (
            f"a touch never got its page: {fs.error!r} {ps.error!r} {fs.landing} {ps.served}"
        )
    assert fs.wait_complete(10) and ps.wait_pushed(5)
    for t, offs in zip(touchers, offsets, strict=True):
        assert t.got == [pair.source.bytes[o : o + 64].tobytes() for o in offs]
    want = pair.source.bytes.copy()
    want[6 * MiB : 6 * MiB + PAGE_SIZE] = written
    assert np.array_equal(pair.dest.bytes, want), "a DMA write lost, or a page landed twice"
    assert np.array_equal(landed, pair.source.bytes), "the hook saw each run as sent"
    assert fs.landing.filled == NPAGES and fs.landing.already == 0
    assert ps.served.pages == NPAGES and fs.present.complete
    assert ps.served.requests >= 1 and fs.requests_sent >= ps.served.requests
    assert ps.served.urgent_pages >= 4, "the DMA's pages and the touches went urgent"
    assert gate.accesses == gate.waited == 2 and gate.waited_s > 0
    waits = fs.blocktime.waits_s
    assert waits and all(w >= 0 for w in waits) and fs.blocktime.waiting == 0
    assert set(fs.blocktime.per_thread_s) == set(vcpus), "each toucher waited"
    assert sum(fs.blocktime.vcpu_blocktime_s()) == pytest.approx(sum(waits))
    assert fs.blocktime.all_blocked_s <= min(fs.blocktime.vcpu_blocktime_s()) + 1e-9
    assert ps.figures() == {"postcopy-requests": ps.served.requests, "postcopy-bytes": SIZE}
    fig = fs.figures()
    assert fig["postcopy-requests"] == fs.requests_sent
    assert fig["postcopy-vcpu-blocktime"] == [
        round(s * 1e3) for s in fs.blocktime.vcpu_blocktime_s()
    ]
    p50, p99 = np.percentile(np.array(waits) * 1e3, [50, 99])
    print(f"\n{len(waits)} fault waits: p50 {p50:.2f} ms p99 {p99:.2f} ms; channels {channels}")


def test_after_a_request_the_push_continues_just_after_it(pair: Pair) -> None:
    ps, fs, _ = connect(pair, max_bandwidth=4e6)
    fs.start()
    ps.start()
    assert fs.request(3 * MiB, PAGE_SIZE) == 1
    assert fs.wait_present(3 * MiB, PAGE_SIZE, 5)
    next_page = (3 * MiB >> 12) + 1
    assert fs.wait_present(next_page * PAGE_SIZE, 4 * PAGE_SIZE, 5), "no locality"
    assert not fs.present.holds(2 * MiB >> 12, 16), "the push jumped, it did not go on"


def test_a_request_outside_guest_ram_stops_the_source_with_one_clear_error(pair: Pair) -> None:
    ps, _, dst = connect(pair, max_bandwidth=4e6)
    ps.start()
    dst.sendall(REQUEST.pack(REQUEST_MAGIC, SIZE, 1))  # the page just past the end
    with pytest.raises(PageServerError) as e:
        ps.wait_pushed(5)
    assert str(e.value) == (
        "post-copy's page server failed: page request refused: RAM 0x800000+0x1000 is "
        "outside guest RAM (0x0-0x800000)"
    )


def test_a_malformed_page_run_fails_the_destination_and_wakes_its_waiters(pair: Pair) -> None:
    _, fs, _ = connect(pair)
    fs.start()
    src = pair.sockets[0]
    src.sendall(RUN.pack(RUN_MAGIC, 0x1234, 1, 1))  # misaligned: never landed
    with pytest.raises(FaultServerError, match="page run refused: RAM offset 0x1234 is not page"):
        fs.wait_present(0, PAGE_SIZE, 5)
    with pytest.raises(FaultServerError, match="post-copy failed: page run refused"):
        fs.wait_complete(1)
    assert not fs.present.holds(0, 1) and fs.landing.received == 0


def test_a_source_closing_early_is_an_error_not_a_hang(pair: Pair) -> None:
    _, fs, _ = connect(pair)
    fs.start()
    src = pair.sockets[0]
    src.sendall(RUN.pack(RUN_MAGIC, 0, 2, 2) + bytes(PAGE_SIZE))  # half a run, then gone
    src.shutdown(2)
    with pytest.raises(FaultServerError, match="closed a page channel early"):
        fs.wait_complete(5)


def test_a_broken_return_path_fails_the_request_and_every_waiter(pair: Pair) -> None:
    _, fs, dst = connect(pair)
    fs.start()
    pair.sockets[0].close()  # the source is gone: the destination's writes break
    pair.sockets.remove(pair.sockets[0])
    with pytest.raises(FaultServerError, match="sending page requests to the source failed"):
        fs.request(0, PAGE_SIZE)
    # Whichever saw the source gone first (the request's send, or the page channel's
    # reader at its EOF) is the error every waiter gets.
    gone = "post-copy failed: (sending page requests|the source closed a page channel early)"
    with pytest.raises(FaultServerError, match=gone):
        fs.wait_present(PAGE_SIZE, PAGE_SIZE, 5)
    assert dst.fileno() >= 0


def test_an_end_with_pages_still_missing_is_an_error(pair: Pair) -> None:
    _, fs, _ = connect(pair)
    fs.present.mark_range(0, NPAGES - 3)  # as pre-copy left it
    fs.start()
    pair.sockets[0].sendall(RUN.pack(RUN_MAGIC, 0, 0, 3))  # "I sent nothing more"
    with pytest.raises(FaultServerError, match="after 0 pages, but 3 pages of guest RAM never"):
        fs.wait_complete(5)


def test_two_sinks_over_one_socket_keep_records_whole(pair: Pair) -> None:
    """Two FdSinks on one fd are one channel to the server: a run is never split by
    another (records interleaved on one socket were the first bug of this test suite)."""
    rng = np.random.default_rng(11)
    touchers = [Toucher(pair.dest, rng.integers(0, SIZE - 64, 30).tolist()) for _ in range(2)]
    pair.threads += touchers
    ps, fs, _ = connect(pair, max_bandwidth=32e6)
    main_src = pair.sockets[0].fileno()
    ps2 = type(ps)(
        pair.source.bytes,
        FdSource(main_src, owned=False),
        FdSink(main_src, owned=False),
        FdSink(main_src, owned=False),
        max_bandwidth=32e6,
    )
    pair.page_server = ps2
    fs.start()
    for t in touchers:
        t.start()
    ps2.start()
    assert fs.wait_complete(20) and fs.landing.filled == NPAGES
    assert np.array_equal(pair.dest.bytes, pair.source.bytes)
