"""The IOMMU's page gate (post-copy's ATS/PRI): every DMA of every device model is handed
to the gate as its translated RAM pieces before it touches memory; a gate that gives up
is that model's DMA fault, with nothing written; no gate changes nothing."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.devices.iommu_layout import split_iommu
from tests.devices.nic import helpers as nh
from tests.devices.vgpu import helpers as vh
from vmferry.devices import dmaengine as de
from vmferry.devices.base import DeviceModel
from vmferry.devices.iommu import DirtyTracking, DmaFault, Iommu, PageGate
from vmferry.devices.nic import close_host
from vmferry.devices.nic import regs as nr
from vmferry.devices.registry import DeviceSpec, create_device
from vmferry.devices.vgpu import registers as R
from vmferry.devices.vgpu.context import ERR_GPU_FAULT, ERR_RING_FAULT
from vmferry.devices.vgpu.scanner import (
    CMD,
    COMPUTE_MATMUL,
    COMPUTE_REDUCE,
    OP_BLIT,
    OP_COMPUTE,
    OP_COPY,
    OP_FENCE,
    OP_FILL,
)
from vmferry.memory import DirtyBitmap, GuestMemory
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.postcopy.iommu_gate import DmaPageGate, DmaPageLost, DmaPageTimeout
from vmferry.migration.postcopy.pages import PresentPages

MiB = 1 << 20
Pieces = list[tuple[int, int]]


class RecordingGate:
    """Lets every access through, noting (pieces, what) in order (devices' threads too)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Pieces, str]] = []
        self._lock = threading.Lock()

    def before_access(self, pieces: Sequence[tuple[int, int]], what: str) -> None:
        with self._lock:
            self.calls.append((list(pieces), what))


class Source:
    """A fault server whose source answers only for pages outside ``never`` (RAM pages)."""

    def __init__(self, npages: int, never: range = range(0)) -> None:
        self.present = PresentPages(npages)
        self.never = never
        self.requested: list[tuple[int, int]] = []
        self.fail: Exception | None = None

    def _span(self, off: int, n: int) -> tuple[int, int]:
        first = off // PAGE_SIZE
        return first, (off + n - 1) // PAGE_SIZE - first + 1

    def request(self, ram_offset: int, length: int) -> int:
        if self.fail is not None:
            raise self.fail
        self.requested.append((ram_offset, length))
        first, count = self._span(ram_offset, length)
        missing = int(self.present.unset_in(first, count)[1].sum())
        for p in range(first, first + count):
            if p not in self.never:
                self.present.mark_range(p, 1)
        return missing

    def wait_present(self, ram_offset: int, length: int, timeout: float) -> bool:
        if self.present.holds(*self._span(ram_offset, length)):
            return True
        time.sleep(timeout)
        return self.present.holds(*self._span(ram_offset, length))


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private host registry (vGPU parents, VFs), as tests/devices/vgpu's conftest gives."""
    monkeypatch.setenv("VMFERRY_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory(32 * MiB)
    yield mem
    mem.close()


def _wait(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _written_outside_the_gate(before: np.ndarray, after: np.ndarray, gate: RecordingGate) -> int:
    """Bytes of RAM that changed outside every piece the gate was shown: a bypass."""
    changed = before != after
    for pieces, _ in gate.calls:
        for off, n in pieces:
            changed[off : off + n] = False
    return int(np.count_nonzero(changed))


# ---- the Iommu itself


def test_reads_and_writes_hand_the_gate_their_translated_pieces(memory: GuestMemory) -> None:
    iommu = split_iommu(memory)
    gate = RecordingGate()
    iommu.set_page_gate(gate)
    data = (np.arange(3 * PAGE_SIZE) % 251).astype(np.uint8)
    iommu.write(0x1000_1000, data)
    back = iommu.read(0x1000_1800, 2 * PAGE_SIZE)
    assert gate.calls == [
        ([(MiB + PAGE_SIZE, PAGE_SIZE), (3 * MiB, 2 * PAGE_SIZE)], "DMA write 0x10001000"),
        ([(MiB + 0x1800, 0x800), (3 * MiB, 0x1800)], "DMA read 0x10001800"),
    ]
    assert back.tobytes() == data[0x800 : 0x800 + 2 * PAGE_SIZE].tobytes()
    iommu.request_pages([(0x1000_0000, 16), (0x1000_3000, PAGE_SIZE), (0x1000_0000, 0)], "job")
    assert gate.calls[-1] == ([(MiB, 16), (3 * MiB + PAGE_SIZE, PAGE_SIZE)], "job")


def test_a_gate_that_gives_up_is_a_dma_fault_and_nothing_is_written(memory: GuestMemory) -> None:
    iommu = split_iommu(memory)
    iommu.set_dirty_tracking(True)
    src = Source(memory.npages, never=range(3 * MiB // PAGE_SIZE, 3 * MiB // PAGE_SIZE + 1))
    iommu.set_page_gate(DmaPageGate(src, timeout_s=0.01))
    with pytest.raises(DmaPageTimeout) as e:
        iommu.write(0x1000_1000, b"\xff" * 2 * PAGE_SIZE)
    assert isinstance(e.value, DmaFault)
    assert str(e.value).startswith("DMA write 0x10001000: RAM 0x300000+0x1000 not present")
    assert not memory.bytes[MiB : 4 * MiB].any() and iommu.bytes_written == 0
    seen = DirtyBitmap(memory.npages)
    iommu.read_and_clear_dirty(seen)
    assert seen.count() == 0, "a refused write dirties nothing"
    # Both pieces were asked for before either was waited on; the present one is there now.
    assert src.requested == [(MiB + PAGE_SIZE, PAGE_SIZE), (3 * MiB, PAGE_SIZE)]
    assert iommu.read(0x1000_1000, 16).tobytes() == bytes(16)


def test_a_failed_fault_server_is_a_dma_fault_naming_the_device(memory: GuestMemory) -> None:
    from vmferry.migration.postcopy.fault_server import FaultServerError

    iommu = Iommu(memory, DirtyTracking.IOMMU, name="dmaengine0")
    src = Source(memory.npages)
    src.fail = FaultServerError("sending page requests to the source failed: broken pipe")
    iommu.set_page_gate(DmaPageGate(src))
    with pytest.raises(DmaPageLost) as e:
        iommu.read(0x2000, 8)
    assert isinstance(e.value, DmaFault)
    assert str(e.value) == (
        "dmaengine0: DMA read 0x2000: its pages cannot arrive: "
        "sending page requests to the source failed: broken pipe"
    )


def test_no_gate_or_a_cleared_one_calls_nothing(memory: GuestMemory) -> None:
    iommu = split_iommu(memory)
    gate = RecordingGate()
    iommu.set_page_gate(gate)
    assert iommu.page_gate is gate
    iommu.set_page_gate(None)
    iommu.write(0x1000_0000, b"abc")
    iommu.request_pages([(0x1000_0000, 3)])
    assert iommu.read(0x1000_0000, 3).tobytes() == b"abc" and gate.calls == []
    with pytest.raises(DmaFault, match="is not mapped"):
        iommu.set_page_gate(gate)
        iommu.read(0x2000_0000, 8)
    assert gate.calls == [], "an unmapped IOVA faults before any page is asked for"


def test_dma_page_gate_is_the_iommus_page_gate() -> None:
    gate: PageGate = DmaPageGate(Source(16))  # mypy checks the protocol; this, at run time
    assert callable(gate.before_access)


# ---- dmaengine

RING, COMP, SRC, DST = 0x100000, 0x180000, 0x200000, 0x300000


def _dmaengine(memory: GuestMemory) -> DeviceModel:
    dev = create_device(DeviceSpec.parse("dmaengine,dirty=iommu"), 0, memory)
    dev.mmio_write(de.REG_KEY, 8, 0xABCDEF)
    dev.mmio_write(de.REG_RING_BASE, 8, RING)
    dev.mmio_write(de.REG_RING_SIZE, 4, 64)
    dev.mmio_write(de.REG_CTRL, 4, de.CTRL_ENABLE)
    return dev


def _dmaengine_jobs(dev: DeviceModel, gate: PageGate | None) -> bytes:
    """A COPY, a FILL and a CHECKSUM; what they leave in RAM."""
    mem = dev.iommu.memory
    mem.bytes[SRC : SRC + 3 * PAGE_SIZE] = (np.arange(3 * PAGE_SIZE) * 7 % 256).astype(np.uint8)
    dev.iommu.set_page_gate(gate)
    descs = [
        de.DESC.pack(de.OP_COPY, 0, SRC + 8, DST + 8, 2 * PAGE_SIZE, 0, COMP, 1, 0),
        de.DESC.pack(de.OP_FILL, 0, 0, DST + 3 * PAGE_SIZE, 64, 0x55AA, COMP + 16, 2, 0),
        de.DESC.pack(de.OP_CHECKSUM, 0, SRC, 0, 3 * PAGE_SIZE, 9, COMP + 32, 3, 0),
    ]
    for i, d in enumerate(descs):
        mem.write_gpa(RING + 64 * i, d)
    dev.mmio_write(de.REG_RING_TAIL, 4, len(descs))
    _wait(lambda: dev.mmio_read(de.REG_RING_HEAD, 4) == len(descs), "the descriptors")
    return mem.read_gpa(DST, 4 * PAGE_SIZE) + mem.read_gpa(COMP, 48)


def test_dmaengine_every_access_goes_through_the_gate_with_its_pieces(
    memory: GuestMemory,
) -> None:
    dev = _dmaengine(memory)
    gate = RecordingGate()
    try:
        _dmaengine_jobs(dev, gate)
    finally:
        dev.close()
    n = 2 * PAGE_SIZE
    name = "dmaengine0"
    assert gate.calls[:5] == [
        ([(RING, 64)], f"{name}: DMA read {RING:#x}"),
        ([(SRC + 8, n), (DST + 8, n), (COMP, 16)], f"{name}: descriptor at {RING:#x}"),
        ([(SRC + 8, n)], f"{name}: DMA read {SRC + 8:#x}"),
        ([(DST + 8, n)], f"{name}: DMA write {DST + 8:#x}"),
        ([(COMP, 16)], f"{name}: DMA write {COMP:#x}"),
    ]
    assert [c[0] for c in gate.calls[5:]] == [
        [(RING + 64, 64)],
        [(DST + 3 * PAGE_SIZE, 64), (COMP + 16, 16)],
        [(DST + 3 * PAGE_SIZE, 64)],
        [(COMP + 16, 16)],
        [(RING + 128, 64)],
        [(SRC, 3 * PAGE_SIZE), (COMP + 32, 16)],
        [(SRC, 3 * PAGE_SIZE)],
        [(COMP + 32, 16)],
    ]


def test_dmaengine_results_are_the_same_with_no_gate_and_a_gate() -> None:
    results = []
    for gate in (None, RecordingGate()):
        mem = GuestMemory(32 * MiB)
        dev = _dmaengine(mem)
        try:
            results.append(_dmaengine_jobs(dev, gate))
            assert dev.mmio_read(de.REG_COMPLETED, 8) == 3
        finally:
            dev.close()
            mem.close()
    assert results[0] == results[1]
    assert results[0][8 : 8 + 2 * PAGE_SIZE] == bytes(
        (np.arange(8, 8 + 2 * PAGE_SIZE) * 7 % 256).astype(np.uint8)
    )


def test_dmaengine_writes_nothing_the_gate_was_not_shown(memory: GuestMemory) -> None:
    dev = _dmaengine(memory)
    gate = RecordingGate()
    try:
        before = memory.bytes.copy()
        after = np.frombuffer(_dmaengine_jobs(dev, gate), np.uint8)
        assert after.any()
        assert _written_outside_the_gate(before, memory.bytes, gate) == 0
    finally:
        dev.close()


def test_dmaengine_a_page_that_never_arrives_is_its_dma_fault(memory: GuestMemory) -> None:
    dev = _dmaengine(memory)
    try:
        src = Source(memory.npages, never=range(DST // PAGE_SIZE + 1, DST // PAGE_SIZE + 2))
        dev.iommu.set_page_gate(DmaPageGate(src, timeout_s=0.02))
        memory.bytes[SRC : SRC + 2 * PAGE_SIZE] = 7
        memory.write_gpa(RING, de.DESC.pack(de.OP_COPY, 0, SRC, DST, 2 * PAGE_SIZE, 0, COMP, 1, 0))
        dev.mmio_write(de.REG_RING_TAIL, 4, 1)
        _wait(lambda: bool(dev.mmio_read(de.REG_STATUS, 4) & de.STATUS_ERROR), "the fault")
        assert dev.mmio_read(de.REG_ERROR_CODE, 4) == de.ERR_DMA_FAULT
        assert dev.mmio_read(de.REG_RING_HEAD, 4) == 0 and dev.mmio_read(de.REG_COMPLETED, 8) == 0
        # The whole descriptor was asked for up front, so nothing of it was written.
        assert not memory.bytes[DST : DST + 2 * PAGE_SIZE].any()
        assert not memory.bytes[COMP : COMP + 16].any()
    finally:
        dev.close()


# ---- the vGPU


@pytest.fixture
def vgpu(memory: GuestMemory) -> Iterator[DeviceModel]:
    dev = vh.make_vgpu(memory)
    vh.map_vram(dev, 16)
    vh.map_system(dev)
    vh.start_ring(dev, size=64, key=0x1234)
    yield dev
    dev.close()


def test_vgpu_job_dma_goes_through_the_gate_with_its_pieces(vgpu: DeviceModel) -> None:
    mem = vgpu.iommu.memory
    mem.bytes[vh.SYS + 0x1000 : vh.SYS + 0x3000] = 3
    gate = RecordingGate()
    vgpu.iommu.set_page_gate(gate)
    n = 2 * PAGE_SIZE
    vh.submit(vgpu, [(OP_COPY, vh.SYS_VA + 0x1000, vh.SYS_VA + 0x4000, n)])
    vh.submit(vgpu, [(OP_FENCE, vh.SYS_VA + 0x8000, 77, 1)])
    vh.wait_idle(vgpu)
    sys, ring = vh.SYS, vh.RING
    # Each ring slot and each command's pages are asked for before the parent's lock is
    # taken; the accesses under it (the slot's read, the FENCE's write) then find them.
    assert gate.calls == [
        ([(ring, 64)], "vgpu0: vGPU ring"),
        ([(ring, 64)], f"vgpu0: DMA read {ring:#x}"),
        ([(sys + 0x1000, n), (sys + 0x4000, n)], "vgpu0: vGPU COPY"),
        ([(sys + 0x1000, n)], f"vgpu0: DMA read {sys + 0x1000:#x}"),
        ([(sys + 0x4000, n)], f"vgpu0: DMA write {sys + 0x4000:#x}"),
        ([(ring + 64, 64)], "vgpu0: vGPU ring"),
        ([(ring + 64, 64)], f"vgpu0: DMA read {ring + 64:#x}"),
        ([(sys + 0x8000, 8)], "vgpu0: vGPU FENCE"),
        ([(sys + 0x8000, 8)], f"vgpu0: DMA write {sys + 0x8000:#x}"),
    ]
    assert mem.read_gpa(sys + 0x4000, n) == b"\x03" * n
    assert mem.read_gpa(sys + 0x8000, 8) == struct.pack("<Q", 77)


def test_vgpu_every_kind_of_command_writes_nothing_the_gate_was_not_shown(
    vgpu: DeviceModel,
) -> None:
    mem = vgpu.iommu.memory
    mem.bytes[vh.SYS : vh.SYS + 0x3000] = (np.arange(0x3000) % 253).astype(np.uint8)
    va = vh.SYS_VA
    cmds = [
        (OP_COPY, va + 0x1000, 0x1000, 4096),  # RAM → VRAM
        (OP_COMPUTE, COMPUTE_REDUCE, 0x1000, 512, va + 0x4000),
        (OP_COMPUTE, COMPUTE_MATMUL, va, va + 256, va + 0x5000, 8, 8, 8),
        (OP_FILL, va + 0x6000, 4096, 0x0102030405060708),
        (OP_BLIT, va + 0x6000, va + 0x7000, 512, 1024, 16, 4),
        (OP_COPY, 0x1000, va + 0x9000, 4096),  # VRAM → RAM
        (OP_FENCE, va + 0xA000, 99, 3),
    ]
    for i, (op, *args) in enumerate(cmds):
        mem.write_gpa(vh.RING + 64 * i, CMD.pack(op, 0, *args, *([0] * (7 - len(args)))))
    before = mem.bytes.copy()
    gate = RecordingGate()
    vgpu.iommu.set_page_gate(gate)
    vgpu.mmio_write(R.RING_TAIL, 4, len(cmds))  # the doorbell only: the test writes no RAM
    vh.wait_idle(vgpu)
    assert vgpu.mmio_read(R.COMPLETED, 8) == len(cmds)
    assert not np.array_equal(before, mem.bytes)
    assert _written_outside_the_gate(before, mem.bytes, gate) == 0
    # The aperture (CPU access to GPU memory through the GGTT) is DMA too.
    vgpu.mmio_write(R.APERTURE_BASE, 8, va + 0xB000)
    vgpu.mmio_write(R.APERTURE + 8, 8, 0xFEED)
    assert vgpu.mmio_read(R.APERTURE + 8, 8) == 0xFEED
    assert gate.calls[-2:] == [
        ([(vh.SYS + 0xB008, 8)], f"vgpu0: DMA write {vh.SYS + 0xB008:#x}"),
        ([(vh.SYS + 0xB008, 8)], f"vgpu0: DMA read {vh.SYS + 0xB008:#x}"),
    ]


def test_vgpu_a_page_that_never_arrives_is_its_gpu_fault_and_the_engine_runs_on(
    vgpu: DeviceModel,
) -> None:
    mem = vgpu.iommu.memory
    fence_page = (vh.SYS + 0x8000) // PAGE_SIZE
    src = Source(mem.npages, never=range(fence_page, fence_page + 1))
    vgpu.iommu.set_page_gate(DmaPageGate(src, timeout_s=0.02))
    for va in (vh.SYS_VA + 0x8000, vh.SYS_VA + 0x9000):
        vh.submit(vgpu, [(OP_COPY, vh.SYS_VA, va, 64), (OP_FENCE, va, 5, 0)])
        vh.wait_idle(vgpu, errors_ok=True)
        assert vgpu.mmio_read(R.ERROR_CODE, 4) == ERR_GPU_FAULT, va
        vgpu.mmio_write(R.CTRL, 4, 0)
        vgpu.mmio_write(R.CTRL, 4, 1)  # re-enabled: the refused command is skipped
    # The COPY and the FENCE to the missing page faulted with nothing written, the fence's
    # registers untouched; the engine thread is alive and the next job runs.
    assert not mem.bytes[vh.SYS + 0x8000 : vh.SYS + 0x8040].any()
    assert vgpu.mmio_read(R.FENCE_VALUE, 8) == 0
    src.never = range(0)
    vh.submit(vgpu, [(OP_FENCE, vh.SYS_VA + 0x8000, 6, 0)])
    vh.wait_idle(vgpu)
    assert mem.read_gpa(vh.SYS + 0x8000, 8) == struct.pack("<Q", 6)
    assert vgpu.mmio_read(R.FENCE_VALUE, 8) == 6


def test_vgpu_a_ring_page_that_never_arrives_is_its_ring_fault(vgpu: DeviceModel) -> None:
    ring_page = vh.RING // PAGE_SIZE
    src = Source(vgpu.iommu.memory.npages, never=range(ring_page, ring_page + 1))
    vgpu.iommu.set_page_gate(DmaPageGate(src, timeout_s=0.02))
    vh.submit(vgpu, [(OP_FENCE, vh.SYS_VA, 1, 0)])
    vh.wait_idle(vgpu, errors_ok=True)
    assert vgpu.mmio_read(R.ERROR_CODE, 4) == ERR_RING_FAULT
    assert vgpu.mmio_read(R.ERROR_ADDR, 8) == vh.RING
    assert vgpu.mmio_read(R.COMPLETED, 8) == 0


# ---- the VF (its rings and buffers)


def test_vf_ring_fetch_and_rx_dma_go_through_the_gate(tmp_path: Path, memory: GuestMemory) -> None:
    host = nh.make_host(tmp_path / "host")
    dev = nh.make_vf(host, memory, DirtyTracking.IOMMU)
    w = nh.Wire(dev)
    try:
        gate = RecordingGate()
        dev.iommu.set_page_gate(gate)
        nh.program(dev)
        ring_bytes = nh.RING * nr.DESC_SIZE
        assert gate.calls == [([(nh.RX_RING, ring_bytes)], f"vf0: DMA read {nh.RX_RING:#x}")]
        fr = nh.frame_to(dev, 1)
        w.send(fr)
        nh.wait_for(lambda: nh.stat(dev, "rx_packets") == 1, "the frame")
        assert gate.calls[1:] == [
            ([(nh.RX_BUFS, len(fr))], f"vf0: DMA write {nh.RX_BUFS:#x}"),
            ([(nh.RX_RING + 8, 8)], f"vf0: DMA write {nh.RX_RING + 8:#x}"),
        ]
        assert memory.read_gpa(nh.RX_BUFS, len(fr)) == fr
    finally:
        w.close()
        dev.close()
        close_host(tmp_path / "host")


def test_vf_a_ring_page_that_never_arrives_is_its_dma_fault(
    tmp_path: Path, memory: GuestMemory
) -> None:
    host = nh.make_host(tmp_path / "host")
    dev = nh.make_vf(host, memory, DirtyTracking.IOMMU)
    try:
        nh.program(dev)
        ring_page = nh.RX_RING // PAGE_SIZE
        src = Source(memory.npages, never=range(ring_page, ring_page + 1))
        dev.iommu.set_page_gate(DmaPageGate(src, timeout_s=0.02))
        dev.mmio_write(nr.queue_reg(0, nr.Q_RX_TAIL), 4, 0)  # the doorbell's fetch faults
        assert dev.mmio_read(nr.REG_ERROR_CODE, 4) == nr.ERR_DMA_FAULT
        assert src.requested == [(nh.RX_RING, nh.RING * nr.DESC_SIZE)]
    finally:
        dev.close()
        close_host(tmp_path / "host")
