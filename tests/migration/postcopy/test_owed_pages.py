"""The pages post-copy owes the destination at the switch: dirty since sent, or never
sent and holding data on the source. A page never sent and not resident (a sparse
guest's untouched RAM) is zero on both sides: not owed, so never read on the source
(a read would allocate it) nor pushed; the destination fills it itself if touched."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import numpy as np

from vmferry.machine.machine import Machine
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.migration.guest_ram import RamMigration

NPAGES = 2048


def test_owed_is_scheduled_and_the_resident_pages_never_sent() -> None:
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    try:
        written = np.array([3, 4, 5, 100, 700, 1500, 2047], dtype=np.int64)
        mem.bytes[written * PAGE_SIZE] = 1  # resident; the rest of RAM is untouched
        ram = RamMigration(cast(Machine, SimpleNamespace(memory=mem)))
        ram.sent.set_pages(np.array([3, 4, 100, 900], dtype=np.int64))  # pre-copy's
        ram.schedule(DirtyBitmap.from_pages(NPAGES, np.array([4, 900], dtype=np.int64)))
        owed = ram.take_owed()
        # 4, 900: dirty since sent; 5, 700, 1500, 2047: resident, never sent.
        assert owed.pages().tolist() == [4, 5, 700, 900, 1500, 2047]
        assert int(np.bitwise_count(mem.resident_bitmap().words).sum()) == written.size
        assert ram.take_owed().pages().tolist() == [5, 700, 1500, 2047], "scheduled: once"
    finally:
        mem.close()
