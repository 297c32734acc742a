"""Device DMA on a post-copy destination, end to end: dmaengine, a vGPU and a VF (its
rings and buffers) work on RAM still missing (userfaultfd-registered, served by the real
fault and page servers over socket pairs) through their gated IOMMUs: descriptors and
commands fetched on demand, no DMA write lost to the background push, every page landed
once."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.devices.nic import helpers as nh
from tests.devices.vgpu import helpers as vh
from tests.migration.postcopy.harness import MiB, Pair, connect, make_pair, uffd_unavailable
from vmferry.devices import dmaengine as de
from vmferry.devices.iommu import DirtyTracking
from vmferry.devices.nic import close_host
from vmferry.devices.nic import regs as nr
from vmferry.devices.registry import DeviceSpec, create_device
from vmferry.devices.vgpu import registers as R
from vmferry.devices.vgpu.scanner import CMD, OP_COPY, OP_FENCE, OP_FILL
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.postcopy.iommu_gate import DmaPageGate

pytestmark = pytest.mark.skipif(
    (why := uffd_unavailable()) is not None, reason=f"no userfaultfd here: {why}"
)
SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFERRY_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = make_pair(SIZE)
    yield p
    p.close()


def _wait(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _serve(pair: Pair) -> DmaPageGate:
    # ~0.5 s to push 8 MiB: the devices' DMA comes well before its pages would.
    ps, fs, _ = connect(pair, channels=2, max_bandwidth=16e6)
    fs.start()
    ps.start()
    return DmaPageGate(fs, timeout_s=10)


def _all_landed(pair: Pair) -> None:
    ps, fs = pair.page_server, pair.fault_server
    assert ps is not None and fs is not None
    assert fs.wait_complete(10) and ps.wait_pushed(5), (fs.error, ps.error)
    assert fs.landing.already == 0, "a page the DMA fetched was not pushed again"
    assert fs.landing.filled == SIZE // PAGE_SIZE


def test_dmaengine_copies_between_missing_pages_and_no_write_is_lost(pair: Pair) -> None:
    ring, comp = 0x10000, 7 * MiB
    src, dst, fill = 1 * MiB + 24, 5 * MiB + 8, 6 * MiB
    n = 3 * PAGE_SIZE
    descs = [
        de.DESC.pack(de.OP_COPY, 0, src, dst, n, 0, comp, 1, 0),
        de.DESC.pack(de.OP_FILL, 0, 0, fill, PAGE_SIZE, 0x0123456789ABCDEF, comp + 16, 2, 0),
    ]
    for i, d in enumerate(descs):
        pair.source.write_gpa(ring + 64 * i, d)  # the guest queued them before the switch
    want = pair.source.bytes.copy()
    dev = create_device(DeviceSpec.parse("dmaengine,dirty=iommu"), 0, pair.dest)
    try:
        gate = _serve(pair)
        dev.iommu.set_page_gate(gate)
        dev.mmio_write(de.REG_RING_BASE, 8, ring)
        dev.mmio_write(de.REG_RING_SIZE, 4, 64)
        dev.mmio_write(de.REG_CTRL, 4, de.CTRL_ENABLE)
        dev.mmio_write(de.REG_RING_TAIL, 4, len(descs))
        _wait(lambda: dev.mmio_read(de.REG_COMPLETED, 8) == 2, "the descriptors")
        assert not dev.mmio_read(de.REG_STATUS, 4) & de.STATUS_ERROR
        assert gate.waited >= 1, "the DMA asked for pages the push had not sent yet"
        _all_landed(pair)
        dev.iommu.set_page_gate(None)  # every page present: as the destination does then
    finally:
        dev.close()
    want[dst : dst + n] = want[src : src + n]
    want[fill : fill + PAGE_SIZE] = np.frombuffer(
        struct.pack("<Q", 0x0123456789ABCDEF) * (PAGE_SIZE // 8), np.uint8
    )
    want[comp : comp + 32] = np.frombuffer(struct.pack("<QQQQ", 1, n, 2, PAGE_SIZE), np.uint8)
    assert np.array_equal(pair.dest.bytes, want), "a DMA write lost, or a page landed twice"


def test_a_vgpu_job_on_missing_pages_completes_with_the_sources_data(pair: Pair) -> None:
    sys_va, sys = vh.SYS_VA, vh.SYS  # the GGTT maps SYS_VA onto guest RAM at SYS
    n = 2 * PAGE_SIZE
    cmds = [
        (OP_COPY, sys_va + 0x1000, sys_va + 0x10000, n),
        (OP_FILL, sys_va + 0x20000, PAGE_SIZE, 0x5A5A5A5A5A5A5A5A),
        (OP_FENCE, sys_va + 0x30000, 42, 0),
    ]
    for i, (op, *args) in enumerate(cmds):
        raw = CMD.pack(op, 0, *args, *([0] * (7 - len(args))))
        pair.source.write_gpa(vh.RING + 64 * i, raw)
    want = pair.source.bytes.copy()
    dev = vh.make_vgpu(pair.dest)
    try:
        gate = _serve(pair)
        dev.iommu.set_page_gate(gate)
        vh.map_system(dev)
        vh.start_ring(dev, size=64)
        dev.mmio_write(R.RING_TAIL, 4, len(cmds))
        vh.wait_idle(dev)
        assert gate.waited >= 1
        _all_landed(pair)
    finally:
        dev.close()
    want[sys + 0x10000 : sys + 0x10000 + n] = want[sys + 0x1000 : sys + 0x1000 + n]
    want[sys + 0x20000 : sys + 0x21000] = 0x5A
    want[sys + 0x30000 : sys + 0x30008] = np.frombuffer(struct.pack("<Q", 42), np.uint8)
    assert np.array_equal(pair.dest.bytes, want), "a DMA write lost, or a page landed twice"


def test_a_vf_receives_into_and_sends_from_missing_pages(tmp_path: Path, pair: Pair) -> None:
    host = nh.make_host(tmp_path / "host")
    dev = nh.make_vf(host, pair.dest, DirtyTracking.IOMMU)  # touches no guest RAM
    w = nh.Wire(dev)
    ring = nh.RING
    fr = nh.frame_to(dev, 3)
    out = fr[6:12] + dev.mac + fr[12:14] + b"tx" * 40  # the reply, to the learned sender
    # Before the switch the driver posted every RX buffer and queued one TX frame.
    for slot in range(ring):
        pair.source.write_gpa(nh.RX_RING + 16 * slot, nr.DESC.pack(nh.RX_BUFS + nh.BUF * slot, 0))
    pair.source.write_gpa(nh.TX_BUFS, out)
    pair.source.write_gpa(nh.TX_RING, nr.DESC.pack(nh.TX_BUFS, len(out) | nr.TXD_EOP | nr.TXD_RS))
    want = pair.source.bytes.copy()
    try:
        gate = _serve(pair)
        dev.iommu.set_page_gate(gate)
        q = 0
        dev.mmio_write(nr.REG_RX_BUF_SIZE, 4, nh.BUF)
        dev.mmio_write(nr.queue_reg(q, nr.Q_RX_BASE), 8, nh.RX_RING)
        dev.mmio_write(nr.queue_reg(q, nr.Q_RX_LEN), 4, ring)
        dev.mmio_write(nr.queue_reg(q, nr.Q_TX_BASE), 8, nh.TX_RING)
        dev.mmio_write(nr.queue_reg(q, nr.Q_TX_LEN), 4, ring)
        dev.mmio_write(nr.queue_reg(q, nr.Q_RX_ENABLE), 4, 1)
        dev.mmio_write(nr.queue_reg(q, nr.Q_TX_ENABLE), 4, 1)
        dev.mmio_write(nr.queue_reg(q, nr.Q_RX_TAIL), 4, ring - 1)  # fetches the ring
        dev.mmio_write(nr.REG_CTRL, 4, nr.CTRL_ENABLE)
        w.send(fr)
        nh.wait_for(lambda: nh.stat(dev, "rx_packets") == 1, "the frame in")
        dev.mmio_write(nr.queue_reg(q, nr.Q_TX_TAIL), 4, 1)
        assert w.recv().frame == out
        assert not dev.mmio_read(nr.REG_ERROR_CODE, 4)
        assert gate.waited >= 1
        _all_landed(pair)
    finally:
        w.close()
        dev.close()
        close_host(tmp_path / "host")
    want[nh.RX_BUFS : nh.RX_BUFS + len(fr)] = np.frombuffer(fr, np.uint8)
    status = len(fr) | nr.RXD_DD | nr.RXD_EOP
    want[nh.RX_RING + 8 : nh.RX_RING + 16] = np.frombuffer(struct.pack("<Q", status), np.uint8)
    tx_status = len(out) | nr.TXD_EOP | nr.TXD_RS | nr.TXD_DD
    want[nh.TX_RING + 8 : nh.TX_RING + 16] = np.frombuffer(struct.pack("<Q", tx_status), np.uint8)
    assert np.array_equal(pair.dest.bytes, want), "a DMA write lost, or a page landed twice"
