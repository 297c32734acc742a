"""Guest RAM over every channel of a migration (QEMU's multifd).

Pages travel on channel (page // 512) % n (``channel.split_by_channel``): a 2 MiB block
always takes the same channel, so a page re-sent later never overtakes its older copy.
Each channel has its own ``RamSender`` and thread; max-bandwidth is one budget shared by
all of them. ``MultifdRam`` is RAM's Migratable on these channels: ``RamMigration``
tracks what is dirty, the channels send it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration import policy
from vmferry.migration.channel import split_by_channel
from vmferry.migration.figures import LiveFigures
from vmferry.migration.guest_ram import RamMigration
from vmferry.migration.migratable import Pending
from vmferry.migration.ram import Batch, RamSender, RamStats
from vmferry.migration.stream import StreamWriter


class RamChannels:
    """One RamSender per channel writer; ``writers[0]`` is the main stream."""

    def __init__(
        self,
        writers: list[StreamWriter],
        ram: RamMigration,
        figures: LiveFigures,
        *,
        compress: bool,
        sealed: bool,
        max_bandwidth: int,
        checkpoint: Callable[[], None],
    ) -> None:
        """``checkpoint`` runs before each batch: it raises to stop the send there (a
        cancel, a guest that ended)."""
        self.writers = writers
        self.ram = ram
        self.figures = figures
        self.checkpoint = checkpoint
        # Under max-bandwidth a batch is one window's budget, so pacing (and the figures
        # query-migrate shows) move in 100 ms steps, not in whole batches.
        batch = policy.batch_pages(max_bandwidth, ram.batch_pages)
        memory = ram.machine.memory
        self.senders = [
            RamSender(w, memory, compress=compress, sealed=sealed, batch_pages=batch)
            for w in writers
        ]
        self.limiter = policy.RateLimiter(max_bandwidth) if max_bandwidth else None
        self._pool = ThreadPoolExecutor(max_workers=len(writers), thread_name_prefix="multifd")

    def send(self, pages: DirtyBitmap, *, live: bool) -> RamStats:
        """``pages`` split over the channels; ``live``: the guest runs, so each batch
        re-arms KVM's log for its own words and is paced to max-bandwidth."""
        parts = split_by_channel(pages, len(self.senders))
        self.figures.sending(pages.count())

        def one(i: int) -> RamStats:
            def before(batch: Batch) -> None:
                self.checkpoint()
                if live:  # the channel's own words: no other channel's pages are re-armed
                    self.ram.rearm(batch)
                    self._pace(batch)

            return self.senders[i].send(
                parts[i], before, live=live, after_batch=self.figures.batch_sent
            )

        # Every channel ends (at its next batch, on a cancel) before a failure is raised:
        # a rollback must not race a channel still re-arming the dirty log.
        sends = [self._pool.submit(one, i) for i in range(len(self.senders))]
        wait(sends)
        total = RamStats()
        for f in sends:
            total.add(f.result())  # the lowest channel's error, if any failed
        return total

    def _pace(self, batch: Batch) -> None:
        if self.limiter is not None:
            time.sleep(self.limiter.delay_for(batch.npages * PAGE_SIZE, time.monotonic()))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class MultifdRam:
    """Guest RAM as a Migratable whose saves go out on every channel."""

    def __init__(self, ram: RamMigration, channels: RamChannels) -> None:
        self.ram = ram
        self.channels = channels
        self.last = RamStats()  # what the last save sent

    @property
    def name(self) -> str:
        return "ram"

    def start_dirty_tracking(self) -> None:
        self.ram.start_dirty_tracking()

    def stop_dirty_tracking(self) -> None:
        self.ram.stop_dirty_tracking()

    def collect_dirty(self, into: DirtyBitmap) -> None:
        self.ram.collect_dirty(into)

    def schedule(self, dirty: DirtyBitmap) -> None:
        self.ram.schedule(dirty)

    def pending(self) -> Pending:
        return self.ram.pending()

    def save_precopy(self, writer: StreamWriter) -> int:
        """``writer`` is the main stream, channel 0; the other channels are RAM's own."""
        self._check_main(writer)
        self.last = self.channels.send(self.ram.take_scheduled(), live=True)
        return self.last.bytes

    def save_final(self, writer: StreamWriter) -> int:
        self._check_main(writer)
        self.last = self.channels.send(self.ram.take_scheduled(), live=False)
        return self.last.bytes

    def _check_main(self, writer: StreamWriter) -> None:
        if writer is not self.channels.writers[0]:
            raise ValueError("RAM's channels start with the main stream: save to that one")


__all__ = ["MultifdRam", "RamChannels"]
