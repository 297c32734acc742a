"""The stop-and-copy: the VM paused, the devices' final state, the last dirty pages, the
CPU state, the digests and END — each a step the source table names, each timed.

The downtime breakdown (pause, device state, final RAM, CPU state, verify, resume) is
written under the stats lock as each part ends, since QMP may read it at any time.
The RAM digests for verification are computed in the background while the last pages
are sent: the VM is stopped, so RAM no longer changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from vmferry.machine.machine import Machine
from vmferry.memory.dirty import DirtyBitmap
from vmferry.migration.codec import (
    CEND,
    DEVS,
    END,
    ROUND,
    VRFY,
    DeviceSummary,
    RoundMarker,
    VerifyRecord,
)
from vmferry.migration.figures import LiveFigures
from vmferry.migration.metrics import DowntimeBreakdown, RoundRecord
from vmferry.migration.precopy import Parts
from vmferry.migration.reachable import reachable_pages
from vmferry.migration.stream import StreamWriter
from vmferry.migration.verify import cpu_digest, page_digests, pre_resume_set

EventSink = Callable[[str, dict[str, Any]], None]
# Test-only (vmferry.testing): called with the source machine after the last dirty sync
# and the final round's send, to write behind the tracking's back.
AfterFinalSync = Callable[[Machine], None]


class StopCopy:
    """One switchover: the instants it passed through, and what it still has to send."""

    def __init__(
        self,
        machine: Machine,
        parts: Parts,
        figures: LiveFigures,
        *,
        verify_seed: int | None,
        digest_pool: ThreadPoolExecutor,
        on_event: EventSink,
        verify_mode: str = "strict",
        after_final_sync: AfterFinalSync | None = None,
    ) -> None:
        """``verify_seed``: digests go in the stream (x-verify), seeded so; None: none.
        ``verify_mode`` on: only what the dirty log cannot vouch for (the audit after
        resume does the rest); strict: every resident page."""
        self.machine = machine
        self.mode = verify_mode
        self.after_final_sync = after_final_sync
        self.parts = parts
        self.figures = figures
        self.seed = verify_seed
        self.digest_pool = digest_pool
        self.on_event = on_event
        self.t_pause: float | None = None  # when the VM was paused for the switchover
        self.paused_by_us = False  # a VM the user had paused stays paused on a rollback
        self._t_paused = self._t_devices = self._t_ram = self._t_cpus = 0.0
        self._device_bytes = 0
        self._digests: Future[npt.NDArray[np.uint64]] | None = None
        self._checked = np.zeros(0, dtype=np.int64)  # the pages the VRFY section digests
        self.pre_resume_ms = 0.0  # the source's share of the pre-resume check

    @property
    def downtime(self) -> DowntimeBreakdown:
        return self.figures.stats.downtime

    def pause(self) -> None:
        m = self.machine
        self.t_pause = time.monotonic()
        self.paused_by_us = not m.paused
        m.pause()
        self.on_event("STOP", {})
        m.set_throttle(0)
        self._t_paused = time.monotonic()
        with self.figures.lock:
            self.downtime.pause_ms = (self._t_paused - self.t_pause) * 1e3

    def stop_devices(self) -> None:
        """Devices quiesce, stop and hand over their state; after this no DMA happens,
        so the next dirty sync is the last word on guest memory."""
        p = self.parts
        self._device_bytes = p.devices.save_final(p.main)
        self._t_devices = time.monotonic()
        with self.figures.lock:
            self.downtime.device_state_ms = (self._t_devices - self._t_paused) * 1e3
            self.figures.stats.device_transferred = p.devices.transferred

    def send_final_round(self, index: int) -> None:
        """The last sync and the pages it found; the stop-and-copy is a round too (the
        destination counts what the source does)."""
        p, mem = self.parts, self.machine.memory
        if self.seed is not None and self.mode == "strict":
            self._checked = mem.resident_pages()
            self._digests = self.digest_pool.submit(page_digests, mem, self._checked, self.seed, 2)
        # The last pre-copy sync's set is still scheduled (it was never sent): DMA dirty
        # bits were read-and-cleared then, so they are carried over, not read again.
        p.collect_dirty(mem.npages, self.figures)
        if self.seed is not None and self.mode == "on":
            reachable = self._reachable()
            # The resident pages (O(RAM) to find) only matter where a device reaches.
            resident = mem.resident_pages() if reachable.size else reachable
            self._checked = pre_resume_set(self._final_pages(), reachable, resident)
            self._digests = self.digest_pool.submit(page_digests, mem, self._checked, self.seed, 2)
        p.ram.save_final(p.main)
        if self.after_final_sync is not None:
            self.after_final_sync(self.machine)
        final = p.ram.last
        p.main.section(ROUND, [RoundMarker(index, final.normal + final.zero, True).encode()])
        self._t_ram = time.monotonic()
        ram_s = max(self._t_ram - self._t_devices, 1e-6)
        nbytes = final.bytes + self._device_bytes
        record = RoundRecord(
            index=index,
            start_s=self._t_paused - self.figures.t0,
            duration_s=self._t_ram - self._t_paused,
            pages=final.normal + final.zero,
            zero_pages=final.zero,
            bytes=nbytes,
            dirty_pages=0,
            dirty_rate=0.0,
            bandwidth=final.bytes / ram_s,
            throttle_pct=self.machine.throttle_pct,
            stop_copy=True,
            device_bytes=self._device_bytes,
        )
        with self.figures.lock:
            self.figures.stats.downtime_bytes = nbytes
            self.downtime.final_ram_ms = (self._t_ram - self._t_devices) * 1e3
        self.figures.round_ended(record, p.device_figures())

    def sync_for_postcopy(self) -> DirtyBitmap:
        """Post-copy's switch: the last sync (devices stopped, VM paused: RAM is frozen
        from here) and the pages owed to the destination; no RAM is sent now. x-verify
        on checks before the resume what a device can reach of what the destination
        holds (the owed pages are digested as they land, and audited with the rest)."""
        p, mem = self.parts, self.machine.memory
        p.collect_dirty(mem.npages, self.figures)
        owed = p.ram.ram.take_owed()
        if self.seed is not None and self.mode == "on":
            reachable = self._reachable()
            resident = mem.resident_pages() if reachable.size else reachable
            held = pre_resume_set(np.zeros(0, dtype=np.int64), reachable, resident)
            self._checked = held[~owed.test(held)] if held.size else held
            self._digests = self.digest_pool.submit(page_digests, mem, self._checked, self.seed, 2)
        self._t_ram = time.monotonic()
        with self.figures.lock:
            self.figures.stats.downtime_bytes = self._device_bytes
            self.downtime.final_ram_ms = (self._t_ram - self._t_devices) * 1e3
        return owed

    def _final_pages(self) -> npt.NDArray[np.int64]:
        # What the final save will send, looked at and put back.
        ram = self.parts.ram.ram
        scheduled = ram.take_scheduled()
        ram.schedule(scheduled)
        return scheduled.pages()

    def _reachable(self) -> npt.NDArray[np.int64]:
        """Every page a device can reach through its IOMMU (all RAM by default)."""
        return reachable_pages(self.machine)

    def send_cpu_and_devices(self) -> None:
        p = self.parts
        p.vcpus.save_final(p.main)
        summary = DeviceSummary.of(p.devices.identities(), p.device_figures())
        p.main.section(DEVS, [summary.encode()])
        self._t_cpus = time.monotonic()
        with self.figures.lock:
            self.downtime.cpu_state_ms = (self._t_cpus - self._t_ram) * 1e3

    def send_verify(self) -> None:
        if self._digests is None:
            return
        state = self.parts.vcpus.saved
        assert state is not None, "the CPU state goes before the digests"
        rec = VerifyRecord(self.seed or 0, self._checked, self._digests.result(), cpu_digest(state))
        self.parts.main.section(VRFY, rec.encode())

    def end_stream(self, writers: list[StreamWriter]) -> None:
        writers[0].section(END, [])
        for w in writers[1:]:
            w.section(CEND, [])
        verify_ms = (time.monotonic() - self._t_cpus) * 1e3 if self._digests is not None else 0.0
        self.pre_resume_ms = verify_ms
        with self.figures.lock:
            self.downtime.verify_ms = verify_ms

    # ---- how it ended
    def saved(self) -> None:
        """A file is whole: the VM stays paused here; the file's digests are checked
        where it is restored, before anything runs there."""
        with self.figures.lock:
            self._total(time.monotonic())
            if self._digests is not None:
                v = self.figures.stats.verify
                v.status = v.cpu_state = "deferred"
                v.pages_checked = int(self._checked.size)
                v.detail = "the file carries the digests; they are checked on restore"

    def verified(self, destination_ms: float) -> None:
        """The destination's load and check, before it said ready."""
        self.pre_resume_ms += destination_ms
        with self.figures.lock:
            self.downtime.verify_ms += destination_ms

    @property
    def checked_pages(self) -> int:
        """How many pages the VRFY section digested."""
        return int(self._checked.size)

    def resumed(self, resume_ms: float) -> None:
        with self.figures.lock:
            self.downtime.resume_ms = resume_ms
            self._total(time.monotonic())

    def roll_back(self) -> None:
        """Run the VM again if this switchover paused it (one the user had paused stays
        paused). It was stopped until now: that is this attempt's downtime, even though
        the migration failed."""
        if self.paused_by_us and self.machine.exit is None:
            self.machine.resume()
            self.on_event("RESUME", {})
        self.paused_by_us = False
        if self.t_pause is None:
            return
        with self.figures.lock:
            st = self.figures.stats
            st.downtime_ms = (time.monotonic() - self.t_pause) * 1e3
            st.downtime.total_ms = st.downtime_ms

    def _total(self, now: float) -> None:
        # Under the caller's lock.
        assert self.t_pause is not None
        st = self.figures.stats
        st.downtime.total_ms = (now - self.t_pause) * 1e3
        st.downtime_ms = st.downtime.total_ms
        st.remaining = 0


__all__ = ["StopCopy"]
