"""A device's DMA on a missing page while post-copy is paused (the link reset or silent):
it stays parked as a vCPU does, its timeout not counted during the pause; after a reattach
it completes with the source's bytes, or, on a new link that answers nothing, times out
only after its full timeout with the link up. A server stopped meanwhile releases it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.migration.postcopy.harness import MiB, Pair, connect, make_pair, uffd_unavailable
from vmferry.devices.iommu import DmaFault
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.liveness import receive_timeout
from vmferry.migration.postcopy.fault_server import FaultServer
from vmferry.migration.postcopy.iommu_gate import DmaPageGate, DmaPageTimeout
from vmferry.migration.postcopy.page_server import PageServer
from vmferry.migration.transport import FdSink, FdSource

pytestmark = pytest.mark.skipif(uffd_unavailable() is not None, reason=str(uffd_unavailable()))

GATE_S = 0.5  # the DMA's timeout here; each pause below lasts several of it


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = make_pair(4 * MiB)
    yield p
    p.close()


def _paused(pair: Pair) -> FaultServer:
    """A fault server whose source never answers: its channel's read times out (EAGAIN),
    which is a broken link (pausable): postcopy-paused."""
    _, fs, main_dst = connect(pair, channels=1)
    pair.page_server = None  # never started: a silent source
    fs.pausable = True
    receive_timeout(main_dst, 0.2)
    fs.start()
    deadline = time.monotonic() + 5
    while fs.broken is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fs.broken is not None and fs.error is None, "the silent link did not pause"
    assert str(fs.broken) == (
        "the source stopped answering during post-copy (nothing on background pages)"
    ), "a silent link is said as such, not as [Errno 11]"
    return fs


def _relink(pair: Pair, fs: FaultServer, *, serve: bool) -> None:
    """As await_recover does: the old channels shut down, their readers gone, a new link
    (with a page server on it if ``serve``)."""
    for s in pair.sockets:
        s.shutdown(socket.SHUT_RDWR)
    assert fs.detach(5), "the old link's reader did not end"
    src, dst = socket.socketpair()
    pair.sockets += [src, dst]
    if serve:
        sink = FdSink(src.fileno(), owned=False)
        requests = FdSource(src.fileno(), owned=False, name="page requests")
        pair.page_server = PageServer(pair.source.bytes, requests, sink, sink).start()
    fs.reattach(
        FdSink(dst.fileno(), owned=False), [FdSource(dst.fileno(), owned=False, name="pages")]
    )


class Dma(threading.Thread):
    """One gated DMA of a page, on its own thread (as a device model's)."""

    def __init__(self, gate: DmaPageGate, offset: int) -> None:
        super().__init__(daemon=True)
        self.gate, self.offset = gate, offset
        self.error: BaseException | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            self.gate.before_access([(self.offset, PAGE_SIZE)], "dmaengine descriptor fetch")
        except BaseException as e:
            self.error = e
        self.ended_at = time.monotonic()


def test_a_dma_waits_through_a_pause_longer_than_its_timeout_then_completes(
    pair: Pair,
) -> None:
    fs = _paused(pair)
    dma = Dma(DmaPageGate(fs, timeout_s=GATE_S), 3 * MiB)
    dma.start()
    dma.join(4 * GATE_S)
    assert dma.is_alive(), f"a DMA was failed while paused: {dma.error}"
    _relink(pair, fs, serve=True)
    dma.join(10)
    assert not dma.is_alive() and dma.error is None, dma.error
    got = pair.dest.bytes[3 * MiB : 3 * MiB + PAGE_SIZE].tobytes()
    assert got == pair.source.bytes[3 * MiB : 3 * MiB + PAGE_SIZE].tobytes()


def test_after_a_reattach_the_clock_counts_again_with_the_link_up(pair: Pair) -> None:
    fs = _paused(pair)
    dma = Dma(DmaPageGate(fs, timeout_s=GATE_S), MiB)
    dma.start()
    dma.join(3 * GATE_S)
    assert dma.is_alive(), f"a DMA was failed while paused: {dma.error}"
    t_relink = time.monotonic()
    _relink(pair, fs, serve=False)  # a new link that answers nothing
    dma.join(10)
    assert isinstance(dma.error, DmaPageTimeout), dma.error
    assert "with the link up" in str(dma.error)
    # Its full timeout after the reattach (the poll while paused may add up to 0.5 s).
    assert dma.ended_at - t_relink >= 0.9 * GATE_S


def test_a_server_stopped_while_paused_releases_the_dma_as_a_fault(pair: Pair) -> None:
    fs = _paused(pair)
    dma = Dma(DmaPageGate(fs, timeout_s=GATE_S), 0)
    dma.start()
    dma.join(2 * GATE_S)
    assert dma.is_alive()
    fs.stop()  # post-copy given up: the destination stops its VM
    dma.join(5)
    assert not dma.is_alive() and isinstance(dma.error, DmaFault), dma.error


class _Stuck:
    """A page channel whose read never returns until released (a reader that outlives the
    link's shutdown)."""

    name = "stuck pages"

    def __init__(self) -> None:
        self.release = threading.Event()

    def readinto(self, buf: memoryview) -> None:
        self.release.wait()
        raise OSError(104, "Connection reset by peer")


def test_detach_says_whether_the_old_links_readers_have_ended(pair: Pair) -> None:
    fs = _paused(pair)
    stuck = _Stuck()
    src, dst = socket.socketpair()
    pair.sockets += [src, dst]
    fs.reattach(FdSink(dst.fileno(), owned=False), [stuck])  # type: ignore[list-item]
    assert not fs.detach(0.1), "a reader still running was reported gone"
    stuck.release.set()
    assert fs.detach(5)
