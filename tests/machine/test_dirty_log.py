"""KVM's dirty log through vmferry: exact, per range, and re-armed by clearing."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from tests.conftest import guest_image
from vmferry.machine import Machine, MachineConfig, run_to_exit
from vmferry.memory import DirtyBitmap

pytestmark = pytest.mark.kvm

WSS_BASE_PAGE = (16 << 20) >> 12  # memtouch lays its working set from 16 MiB


def memtouch(vcpus: int, args: str, memory: int = 256 << 20) -> Machine:
    config = MachineConfig(
        memory=memory, vcpus=vcpus, image=str(guest_image("memtouch")), cmdline=args
    )
    m = Machine.boot(config, serial=io.BytesIO())
    m.set_dirty_logging(True)
    return m


@pytest.mark.parametrize("vcpus", [1, 2])
def test_dirty_log_is_exactly_the_pages_the_guest_wrote(vcpus: int) -> None:
    with memtouch(vcpus, "wss=4M pattern=seq rounds=1") as m:
        assert run_to_exit(m, timeout=30).code == 0
        log = DirtyBitmap(m.memory.npages)
        m.fetch_dirty_log(log)
    pages = log.pages()
    wss = np.arange(WSS_BASE_PAGE, WSS_BASE_PAGE + 1024)
    assert np.array_equal(pages[pages >= WSS_BASE_PAGE], wss)
    # The rest is the guest's own image, stacks and page tables, far below the working set.
    assert pages[pages < WSS_BASE_PAGE].max() < (8 << 20) >> 12


def test_clearing_a_range_clears_exactly_that_range() -> None:
    with memtouch(2, "wss=4M pattern=seq rounds=1") as m:
        assert run_to_exit(m, timeout=30).code == 0
        before = DirtyBitmap(m.memory.npages)
        m.fetch_dirty_log(before)
        m.clear_dirty_log(before, first=WSS_BASE_PAGE + 256, count=512)
        after = DirtyBitmap(m.memory.npages)
        m.fetch_dirty_log(after)
    cleared = set(range(WSS_BASE_PAGE + 256, WSS_BASE_PAGE + 768))
    assert set(after.pages().tolist()) == set(before.pages().tolist()) - cleared


def test_cleared_pages_are_logged_again_when_written_and_a_paused_vm_dirties_nothing() -> None:
    with memtouch(1, "wss=8M pattern=seq rate=40 rounds=1000") as m:
        m.start()
        time.sleep(0.3)
        log = DirtyBitmap(m.memory.npages)
        m.fetch_dirty_log(log)
        m.clear_dirty_log(log)
        time.sleep(0.3)
        again = DirtyBitmap(m.memory.npages)
        m.fetch_dirty_log(again)
        written = again.pages()
        assert written.size > 0
        assert (written[written >= WSS_BASE_PAGE] < WSS_BASE_PAGE + 2048).all()
        m.pause()
        m.clear_dirty_log(again)
        settle = DirtyBitmap(m.memory.npages)
        m.fetch_dirty_log(settle)
        m.clear_dirty_log(settle)
        time.sleep(0.2)
        paused = DirtyBitmap(m.memory.npages)
        m.fetch_dirty_log(paused)
        assert paused.count() == 0
