"""The device conformance kit: what every device model must do, checked the same way.

A device's tests call :func:`check_all` (or the checks one by one) with a
:class:`DeviceUnderTest` that says how to build the device, how to make it do some work,
and how to read its state for comparison. Each check raises ``AssertionError`` with what
was wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmferry.devices import fsm
from vmferry.devices.base import DeviceError, DeviceModel
from vmferry.devices.fsm import FsmError, MigCap, MigState
from vmferry.devices.iommu import DirtyTracking
from vmferry.devices.stream import DeviceStreamError
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory

MEMORY = 64 << 20


@dataclass
class DeviceUnderTest:
    """How to build, exercise and fingerprint one device model."""

    make: Callable[[GuestMemory, DirtyTracking], DeviceModel]
    exercise: Callable[[DeviceModel, int], None]  # (device, round): do some DMA work
    fingerprint: Callable[[DeviceModel], Any]  # device state to compare after a move

    def build(self, mode: DirtyTracking = DirtyTracking.IOMMU) -> tuple[GuestMemory, DeviceModel]:
        memory = GuestMemory(MEMORY)
        return memory, self.make(memory, mode)


def _drain(dev: DeviceModel) -> bytes:
    out = b""
    while True:
        chunk = dev.read_data(1 << 16)
        if not chunk:
            return out
        out += chunk


def saved_stream(dut: DeviceUnderTest, memory: GuestMemory, dev: DeviceModel) -> bytes:
    """Run the device through a whole source-side migration and return its stream."""
    data = b""
    dut.exercise(dev, 0)
    if dev.caps & MigCap.PRE_COPY:
        dev.set_state(MigState.PRE_COPY)
        data += _drain(dev)
        dut.exercise(dev, 1)  # more work while pre-copying: dirty device state
        data += _drain(dev)
    dev.set_state(MigState.STOP_COPY)
    data += _drain(dev)
    return data


def check_every_path(dut: DeviceUnderTest) -> None:
    """Every (from, to) pair of the device's states is reachable and lands exactly there,
    or is refused with FsmError, and a refused request leaves the state unchanged."""
    memory, ref = dut.build()
    stream = saved_stream(dut, memory, ref)
    ref.close()
    caps = ref.caps
    states = sorted(fsm.states_for(caps) - {MigState.ERROR})
    for start in states:
        for target in states:
            mem, dev = dut.build()
            try:
                dev.set_state(start)
                if start is MigState.RESUMING:
                    dev.write_data(stream)
                assert dev.state is start, f"asked {start.name}, got {dev.state.name}"
                try:
                    dev.set_state(target)
                except FsmError:
                    assert dev.state is start, "a refused request changed the state"
                    continue
                assert dev.state is target, f"{start.name}→{target.name} ended in {dev.state.name}"
            finally:
                dev.close()
                mem.close()
    memory.close()


def check_round_trip(dut: DeviceUnderTest) -> None:
    """State saved on one instance and loaded into another compares equal."""
    mem_a, a = dut.build()
    stream = saved_stream(dut, mem_a, a)
    mem_b, b = dut.build()
    try:
        b.set_state(MigState.RESUMING)
        for i in range(0, len(stream), 4096):  # written in pieces, as a stream arrives
            b.write_data(stream[i : i + 4096])
        b.set_state(MigState.STOP)
        assert dut.fingerprint(b) == dut.fingerprint(a), "restored state differs"
        b.set_state(MigState.RUNNING)
        a.set_state(MigState.STOP)
    finally:
        for d, m in ((a, mem_a), (b, mem_b)):
            d.close()
            m.close()


def check_bad_streams_refused(dut: DeviceUnderTest) -> None:
    """A truncated or corrupt resuming stream is refused — by the write or by the commit —
    and the device stays in RESUMING."""
    mem_a, a = dut.build()
    stream = saved_stream(dut, mem_a, a)
    a.close()
    mem_a.close()
    damaged = bytearray(stream)
    damaged[len(damaged) // 2] ^= 0x40
    for bad in (stream[: len(stream) // 2], bytes(damaged), b""):
        mem, dev = dut.build()
        try:
            dev.set_state(MigState.RESUMING)
            try:
                dev.write_data(bad)
                dev.set_state(MigState.STOP)
            except DeviceStreamError:
                assert dev.state is MigState.RESUMING, "a refused stream changed the state"
            else:
                raise AssertionError(f"a bad stream of {len(bad)} bytes was accepted")
        finally:
            dev.close()
            mem.close()


def check_precopy_accounting(dut: DeviceUnderTest) -> None:
    """initial_bytes starts non-zero and falls to 0 as read; 'nothing now' is None in
    PRE_COPY; the end of STOP_COPY is b''; PRECOPY_INFO is refused outside pre-copy."""
    memory, dev = dut.build()
    try:
        if not dev.caps & MigCap.PRE_COPY:
            return
        try:
            dev.precopy_info()
        except DeviceError:
            pass
        else:
            raise AssertionError("PRECOPY_INFO answered in RUNNING")
        dut.exercise(dev, 0)
        dev.set_state(MigState.PRE_COPY)
        initial, _ = dev.precopy_info()
        assert initial > 0, "no initial data"
        read = 0
        while True:
            chunk = dev.read_data(1000)
            if chunk is None:
                break
            assert chunk, "an empty read in PRE_COPY must be None, not b''"
            read += len(chunk)
            now, _ = dev.precopy_info()
            assert now == max(0, initial - read), f"initial_bytes {now} after {read} read"
        assert dev.precopy_info()[0] == 0
        assert dev.read_data() is None, "nothing now must stay None"
        dev.set_state(MigState.STOP_COPY)
        assert dev.stop_copy_size() > 0
        _drain(dev)
        assert dev.read_data() == b"", "the end of STOP_COPY must read b''"
    finally:
        dev.close()
        memory.close()


def check_reset_from_error(dut: DeviceUnderTest) -> None:
    """A transition that breaks puts the device in ERROR; only reset leaves it, and it
    invalidates open streams."""
    memory, dev = dut.build()
    try:
        original = dev.on_arc

        def broken(cur: MigState, nxt: MigState) -> None:
            raise RuntimeError("the device hung")

        dev.on_arc = broken  # type: ignore[method-assign]
        target = MigState.PRE_COPY if dev.caps & MigCap.PRE_COPY else MigState.STOP
        with contextlib.suppress(DeviceError):
            dev.set_state(target)
        assert dev.state is MigState.ERROR, f"a broken arc left {dev.state.name}"
        dev.on_arc = original  # type: ignore[method-assign]
        try:
            dev.set_state(MigState.RUNNING)
        except FsmError as e:
            assert "reset" in str(e)
        else:
            raise AssertionError("left ERROR without a reset")
        dev.reset()
        state: MigState = dev.state  # (mypy narrowed it to ERROR above)
        assert state is MigState.RUNNING
        try:
            dev.read_data()
        except DeviceError:
            pass
        else:
            raise AssertionError("a stream survived the reset")
        dut.exercise(dev, 0)  # and it works again
    finally:
        dev.close()
        memory.close()


def check_dma_logging(dut: DeviceUnderTest) -> None:
    """VFIO DMA logging: ranges, page sizes, only writes inside the ranges, read-and-clear,
    and the refusals (overlap, too many ranges, misalignment, bad page size)."""
    memory, dev = dut.build(DirtyTracking.DEVICE)
    try:
        base = 32 << 20
        for bad, why in (
            ([(base, 8192), (base + 4096, 8192)], "overlapping"),
            ([(base + i * 8192, 4096) for i in range(257)], "more than 256"),
            ([(base + 100, 4096)], "misaligned"),
            ([], "no"),
        ):
            try:
                dev.dma_logging_start(bad, PAGE_SIZE)
            except DeviceError:
                pass
            else:
                raise AssertionError(f"{why} ranges were accepted")
        try:
            dev.dma_logging_start([(base, 1 << 20)], 3000)
        except DeviceError:
            pass
        else:
            raise AssertionError("page size 3000 was accepted")
        page = dev.dma_logging_start([(base, 1 << 20), (base + (4 << 20), 1 << 20)], 8192)
        iommu = dev.iommu
        iommu.write(base + 3 * 8192 + 5, b"x")  # page 3 of range 0
        iommu.write(base + (4 << 20) + 8190, b"yz" * 2)  # pages 0 and 1 of range 1
        iommu.write(base + (2 << 20), b"outside")  # not logged
        _ = iommu.read(base, 4096)  # reads are never logged
        r0 = dev.dma_logging_report(base, 1 << 20)
        r1 = dev.dma_logging_report(base + (4 << 20), 1 << 20)
        assert page == 8192
        assert _set_bits(r0) == [3], f"range 0 reported pages {_set_bits(r0)}"
        assert _set_bits(r1) == [0, 1], f"range 1 reported pages {_set_bits(r1)}"
        assert not _set_bits(dev.dma_logging_report(base, 1 << 20)), "report did not clear"
        dev.dma_logging_stop()
        try:
            dev.dma_logging_report(base, 1 << 20)
        except DeviceError:
            pass
        else:
            raise AssertionError("report after stop answered")
    finally:
        dev.close()
        memory.close()


def _set_bits(bits: np.ndarray) -> list[int]:
    out = np.unpackbits(bits.view(np.uint8), bitorder="little")
    return [int(i) for i in np.flatnonzero(out)]


ALL_CHECKS = (
    check_every_path,
    check_round_trip,
    check_bad_streams_refused,
    check_precopy_accounting,
    check_reset_from_error,
    check_dma_logging,
)


def check_all(dut: DeviceUnderTest) -> None:
    for check in ALL_CHECKS:
        check(dut)
