"""Guest RAM as a Migratable: KVM's dirty log says what the vCPUs wrote, the engine adds
what devices' DMA wrote (schedule), and each save sends what is scheduled."""

from __future__ import annotations

import numpy as np

from vmferry.machine.machine import Machine
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.migratable import Pending
from vmferry.migration.ram import DEFAULT_BATCH_PAGES, Batch, RamSender
from vmferry.migration.stream import StreamWriter


class RamMigration:
    """The RAM of one running machine, on one stream."""

    def __init__(self, machine: Machine, batch_pages: int = DEFAULT_BATCH_PAGES) -> None:
        self.machine = machine
        self.batch_pages = batch_pages
        self._scheduled = DirtyBitmap(machine.memory.npages)  # what the next save sends
        # Every page handed to a save so far: what post-copy's destination may hold.
        self.sent = DirtyBitmap(machine.memory.npages)

    @property
    def name(self) -> str:
        return "ram"

    def start_dirty_tracking(self) -> None:
        self.machine.set_dirty_logging(True)
        # Round 0: all RAM that holds data (holes are zero on the destination already).
        self._scheduled = self.machine.memory.resident_bitmap()

    def stop_dirty_tracking(self) -> None:
        self.machine.set_dirty_logging(False)

    def collect_dirty(self, into: DirtyBitmap) -> None:
        self.machine.fetch_dirty_log(into)

    def schedule(self, dirty: DirtyBitmap) -> None:
        """Pages to send next: the round's dirty set, every part's collect merged."""
        self._scheduled.merge(dirty)

    def pending(self) -> Pending:
        return Pending(self._scheduled.count() * PAGE_SIZE)

    def take_scheduled(self) -> DirtyBitmap:
        """What the next save would send, handed over (a sender of its own, e.g. one per
        multifd channel, sends it; ``rearm`` each batch while the guest runs)."""
        pages, self._scheduled = self._scheduled, DirtyBitmap(self._scheduled.npages)
        self.sent.merge(pages)
        return pages

    def take_owed(self) -> DirtyBitmap:
        """Post-copy's switch (the VM paused): the pages the destination lacks or holds
        stale — dirty since they were sent (scheduled), or never sent and holding data
        here — handed over to the page server. A page never sent and not resident here
        is zero on both sides: the destination fills it with zeros itself if it is ever
        touched (a hole), so it is neither read here (which would allocate it) nor sent."""
        owed = self.machine.memory.resident_bitmap()  # mincore: no bit past the last page
        np.bitwise_and(owed.words, ~self.sent.words, out=owed.words)
        owed.merge(self._scheduled)
        self._scheduled = DirtyBitmap(owed.npages)
        return owed

    def save_precopy(self, writer: StreamWriter) -> int:
        return self._send(writer, self.take_scheduled(), live=True)

    def save_final(self, writer: StreamWriter) -> int:
        return self._send(writer, self.take_scheduled(), live=False)

    def _send(self, writer: StreamWriter, pages: DirtyBitmap, *, live: bool) -> int:
        # live: the guest runs, so a page may change while it is sent (FLAG_LIVE); KVM's
        # log is re-armed for each batch just before it is read, so such a write is seen
        # at the next sync and the page goes again.
        sender = RamSender(writer, self.machine.memory, batch_pages=self.batch_pages)
        return sender.send(pages, self.rearm if live else None, live=live).bytes

    def rearm(self, batch: Batch) -> None:
        """Clear KVM's log for exactly this batch's words, just before they are read."""
        self.machine.clear_dirty_log(batch.dirty, batch.first_page, batch.page_span)
