"""Guest RAM pre-faulted ahead of the data: the plan, the receivers' ensure, stop, failure,
and data landing while it runs."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from tests.migration.ramload import load_ram
from vmferry.memory import DirtyBitmap, GuestMemory
from vmferry.memory.populate import (
    BLOCK_SHIFT,
    PopulateError,
    Populator,
    merged,
    plan_pieces,
    populates_ahead,
)
from vmferry.migration import codec
from vmferry.migration.channel import CHANNEL_BLOCK_SHIFT, split_by_channel
from vmferry.migration.ram import RamReceiver, RamSender
from vmferry.migration.stream import StreamWriter
from vmferry.testing.transport import MemorySink

MIB = 1 << 20
BLOCK = 1 << BLOCK_SHIFT
BLOCK_PAGES = BLOCK >> 12


class Recorder:
    """A populate function that records (offset, length, thread name), optionally gated
    or failing at one offset."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, int, str]] = []
        self.fail_at = fail_at
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, offset: int, length: int) -> bool:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        with self.lock:
            self.calls.append((offset, length, threading.current_thread().name))
        return True

    def covered(self) -> list[tuple[int, int]]:
        with self.lock:
            calls = sorted((o, o + n) for o, n, _ in self.calls)
        if not calls:
            return []
        s = np.array([a for a, _ in calls], dtype=np.int64)
        e = np.array([b for _, b in calls], dtype=np.int64)
        return merged(s, e)


def wait_for(cond: Callable[[], bool], what: str) -> None:
    """Wait for a state the threads reach by themselves (not a timing check)."""
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.001)


def pages(*offsets_and_lengths: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    first = np.array([o >> 12 for o, _ in offsets_and_lengths], dtype=np.int64)
    n = np.array([max(1, n >> 12) for _, n in offsets_and_lengths], dtype=np.int64)
    return first, n


def test_plan_cuts_ranges_at_blocks_clips_and_sorts() -> None:
    s, e = plan_pieces(
        [(10 * MIB, 11 * MIB), (MIB, 5 * MIB + 8192), (30 * MIB, 99 * MIB)], 32 * MIB
    )
    pieces = list(zip(s.tolist(), e.tolist(), strict=True))
    assert pieces == [
        (MIB, 2 * MIB),
        (2 * MIB, 4 * MIB),
        (4 * MIB, 5 * MIB + 8192),
        (10 * MIB, 11 * MIB),
        (30 * MIB, 32 * MIB),
    ]
    assert merged(s, e) == [(MIB, 5 * MIB + 8192), (10 * MIB, 11 * MIB), (30 * MIB, 32 * MIB)]


def test_the_thread_populates_exactly_the_ranges_asked_in_ascending_order() -> None:
    rec = Recorder()
    asked = [(40 * MIB, 64 * MIB), (4096, 3 * MIB), (20 * MIB + 4096, 20 * MIB + 8192)]
    p = Populator(64 * MIB, asked, rec, ahead=None).start()
    wait_for(lambda: p.finished, "the populator finished")
    p.stop()
    assert rec.covered() == sorted(asked)
    offsets = [o for o, _, _ in rec.calls]
    assert offsets == sorted(offsets)  # the order the source sends in
    assert {t for _, _, t in rec.calls} == {"populate"}
    assert sum(n for _, n, _ in rec.calls) == sum(b - a for a, b in asked)  # nothing twice


def test_the_thread_stays_a_bounded_distance_ahead_of_the_receivers() -> None:
    rec = Recorder()
    p = Populator(256 * MIB, [(0, 256 * MIB)], rec, ahead=8 * MIB).start()
    # No receiver yet: it stops at the bound past block 0 (blocks 0..4).
    wait_for(lambda: p.done_blocks() == 5, "the populator reached its bound")
    time.sleep(0.05)  # would it go on? (the bound is what stops it, not a clock)
    assert p.done_blocks() == 5 and not p.finished
    p.ensure(*pages((20 * BLOCK, 4096)))  # a receiver lands data in block 20
    wait_for(lambda: p.done_blocks() == 25, "the populator moved on with the front")
    p.stop()
    assert rec.covered()[0] == (0, 25 * BLOCK)


def test_ensure_populates_a_block_not_reached_on_the_callers_thread_and_once() -> None:
    rec = Recorder()
    p = Populator(128 * MIB, [(0, 128 * MIB)], rec, ahead=2 * MIB).start()
    wait_for(lambda: p.done_blocks() == 2, "the populator reached its bound")
    p.ensure(*pages((30 * BLOCK + 8192, 3 * BLOCK)))  # blocks 30..33
    mine = [(o, n) for o, n, t in rec.calls if t == threading.current_thread().name]
    assert mine == [(30 * BLOCK, 4 * BLOCK)]
    p.ensure(*pages((63 * BLOCK, 4096)))  # the last block: the thread may do all the rest
    wait_for(lambda: p.finished, "the populator finished")
    p.stop()
    assert rec.covered() == [(0, 128 * MIB)]
    assert sum(n for _, n, _ in rec.calls) == 128 * MIB  # blocks 30..33 not done again


def test_ensure_outside_the_plan_costs_nothing_and_waits_for_nothing() -> None:
    rec = Recorder()
    p = Populator(64 * MIB, [(0, 4 * MIB)], rec, ahead=None).start()
    wait_for(lambda: p.finished, "the populator finished")
    p.ensure(*pages((32 * MIB, MIB)))
    p.stop()
    assert rec.covered() == [(0, 4 * MIB)]


def test_stop_ends_the_thread_after_the_call_in_progress() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    p = Populator(256 * MIB, [(0, 256 * MIB)], rec, ahead=None).start()
    assert rec.entered.wait(30)
    stopper = threading.Thread(target=p.stop)
    stopper.start()
    rec.gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert p._thread is not None and not p._thread.is_alive()
    assert len(rec.calls) == 1  # the burst it was in, nothing after
    p.ensure(*pages((200 * MIB, MIB)))  # after stop: a receiver is not held up
    assert len(rec.calls) == 1  # nor does it populate anything itself


def test_closing_guest_memory_stops_its_populator() -> None:
    m = GuestMemory(64 * MIB)
    p = m.populate_ahead([(0, 64 * MIB)], cpus=2, ahead=2 * MIB)
    wait_for(lambda: p.done_blocks() >= 1, "the populator started")
    m.close()
    assert p._thread is not None and not p._thread.is_alive()
    assert p.done_blocks() < 32  # it never got past its bound


def test_a_failure_in_the_thread_is_raised_to_the_receiver() -> None:
    rec = Recorder(fail_at=3 * BLOCK)
    p = Populator(64 * MIB, [(0, 64 * MIB)], rec, ahead=None).start()
    wait_for(lambda: p.finished, "the populator gave up")
    with pytest.raises(
        PopulateError, match=r"cannot allocate guest RAM at offset 0x.*Cannot allocate"
    ):
        p.ensure(*pages((40 * MIB, MIB)))
    p.stop()


def test_a_failure_in_the_receivers_own_populate_is_raised() -> None:
    rec = Recorder(fail_at=30 * BLOCK)
    p = Populator(64 * MIB, [(0, 64 * MIB)], rec, ahead=2 * MIB).start()
    wait_for(lambda: p.done_blocks() == 2, "the populator reached its bound")
    with pytest.raises(PopulateError, match="cannot allocate guest RAM"):
        p.ensure(*pages((30 * BLOCK, BLOCK)))
    p.stop()


def test_a_failure_nobody_needed_is_logged_at_stop(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(fail_at=0)
    p = Populator(8 * MIB, [(0, 8 * MIB)], rec, ahead=None).start()
    wait_for(lambda: p.finished, "the populator gave up")
    with caplog.at_level(logging.WARNING):
        p.stop()
    assert "pre-faulting guest RAM stopped: cannot allocate guest RAM" in caplog.text


def test_a_kernel_without_populate_write_ends_it_quietly() -> None:
    calls: list[int] = []

    def unsupported(offset: int, length: int) -> bool:
        calls.append(offset)
        return False

    p = Populator(64 * MIB, [(0, 64 * MIB)], unsupported, ahead=None).start()
    wait_for(lambda: p.finished, "the populator gave up")
    p.ensure(*pages((40 * MIB, MIB)))  # no error: pages fault in as they are written
    p.stop()
    assert p.error is None and calls == [0]


def test_real_memory_is_populated_as_asked_and_prealloc_skips_it() -> None:
    m = GuestMemory(32 * MIB)
    try:
        asked = [(2 * MIB, 6 * MIB + 4096), (20 * MIB, 21 * MIB)]
        p = m.populate_ahead(asked, cpus=2, ahead=None)
        wait_for(lambda: p.finished, "the populator finished")
        m.stop_populating()
        assert m.data_ranges() == asked
    finally:
        m.close()
    pre = GuestMemory(8 * MIB)
    try:
        pre.populate()
        assert pre.populate_ahead([(0, 8 * MIB)], cpus=2).finished  # nothing to do
    finally:
        pre.close()


@pytest.mark.parametrize("channels", [1, 2])
def test_ram_received_while_it_populates_is_intact(channels: int) -> None:
    size = 64 * MIB
    src = GuestMemory(size)
    dst = GuestMemory(size)
    try:
        rng = np.random.default_rng(channels)
        src.pages()[:] = rng.integers(1, 2**63, src.pages().shape, dtype=np.uint64)
        src.pages()[5000:5100] = 0  # zero runs too
        resident = src.data_ranges()
        sinks = [MemorySink() for _ in range(channels)]
        everything = DirtyBitmap.from_pages(src.npages, src.resident_pages())
        for part, sink in zip(split_by_channel(everything, channels), sinks, strict=True):
            w = StreamWriter(sink)
            w.section(codec.CONF, [b"{}"])
            RamSender(w, src, batch_pages=1024).send(part)
            for tag in (codec.CPUS, codec.DEVS, codec.END):
                w.section(tag, [b"{}"] if tag != codec.END else [])
        dst.populate_ahead(resident, cpus=2, ahead=4 * MIB)  # racing the receivers
        written = DirtyBitmap(dst.npages)
        rxs = [RamReceiver(dst, written, i, channels) for i in range(channels)]
        errors: list[BaseException] = []

        def receive(data: bytes, rx: RamReceiver) -> None:
            try:
                load_ram(data, rx)
            except BaseException as e:
                errors.append(e)

        threads = [
            threading.Thread(target=receive, args=(bytes(s.data), rx))
            for s, rx in zip(sinks, rxs, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        dst.stop_populating()
        assert not errors
        assert np.array_equal(src.pages(), dst.pages())
        assert dst.populator is not None and dst.populator.error is None
    finally:
        src.close()
        dst.close()


def test_block_matches_a_channel_block() -> None:
    assert BLOCK_PAGES == 1 << CHANNEL_BLOCK_SHIFT  # one channel's receiver per block


def test_a_thread_ahead_only_when_the_receivers_leave_it_a_cpu() -> None:
    assert populates_ahead(1, 2) and populates_ahead(2, 16)
    assert not populates_ahead(2, 2) and not populates_ahead(4, 2)
    m = GuestMemory(8 * MIB)
    try:
        assert m.populate_ahead([(0, 8 * MIB)], receivers=2, cpus=2).finished  # no plan
        assert m.data_ranges() == []  # nothing pre-faulted: pages fault in as they land
        p = m.populate_ahead([(0, 8 * MIB)], receivers=1, cpus=2, ahead=None)
        wait_for(lambda: p.finished, "the populator finished")
        assert m.data_ranges() == [(0, 8 * MIB)]
    finally:
        m.close()
