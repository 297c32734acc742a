"""Blocktime with QEMU's meanings: per vCPU, its own waits; in all, only the time when
every vCPU waited at once. Threads that are not vCPUs never count towards the total."""

from __future__ import annotations

import pytest

from vmferry.migration.postcopy.blocktime import Blocktime


def test_total_counts_only_time_when_every_vcpu_waits() -> None:
    bt = Blocktime.of([1, 2])
    bt.blocked(1, page=10, t=0.0)
    bt.blocked(2, page=20, t=1.0)  # from here both wait
    assert bt.landed(20, 1, t=3.0) == 1  # vCPU 2 runs again: 2 s of "all blocked"
    assert bt.landed(10, 1, t=4.0) == 1
    assert bt.all_blocked_s == pytest.approx(2.0)
    assert bt.vcpu_blocktime_s() == pytest.approx([4.0, 2.0])
    assert sorted(bt.waits_s) == pytest.approx([2.0, 4.0]) and bt.waiting == 0


def test_a_run_releases_every_thread_waiting_inside_it_and_no_other() -> None:
    bt = Blocktime.of([1, 2, 3])
    for tid, page in ((1, 5), (2, 6), (3, 40)):
        bt.blocked(tid, page, 0.0)
    assert bt.landed(0, 16, 0.5) == 2
    assert bt.all_blocked_s == pytest.approx(0.5) and bt.waiting == 1
    assert bt.landed(0, 16, 0.9) == 0, "nobody left waiting in that run"
    bt.landed(40, 1, 1.0)
    assert bt.vcpu_blocktime_s() == pytest.approx([0.5, 0.5, 1.0])


def test_a_repeated_fault_keeps_its_first_start_and_a_non_vcpu_never_counts() -> None:
    bt = Blocktime.of([1])
    bt.blocked(99, 7, 0.0)  # a toucher or device thread
    bt.blocked(1, 3, 1.0)
    bt.blocked(1, 3, 1.5)  # the same wait, read again
    bt.landed(3, 1, 2.0)
    bt.landed(7, 1, 5.0)
    assert bt.per_thread_s == pytest.approx({1: 1.0, 99: 5.0})
    assert bt.all_blocked_s == pytest.approx(1.0), "the one vCPU waited 1 s"
