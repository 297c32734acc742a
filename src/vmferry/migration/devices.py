"""Devices in a migration: set-up checks, DMA dirty tracking, pre-copy data, the
stop-and-copy of device state, and putting devices back after a failure.

The source drives each device through the VFIO v2 states (REFERENCE.md §3): PRE_COPY
while RAM is copied, RUNNING_P2P/PRE_COPY_P2P for all of them at the switchover, then each
to STOP_COPY and its stream read to the end. The destination puts each in RESUMING, writes
the stream, commits with STOP, then RUNNING_P2P → RUNNING before the vCPUs run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from vmferry.devices.base import DeviceError, DeviceIdentity, DeviceModel, OutputGate
from vmferry.devices.dirtylog import DmaDirtyLog, dma_dirty_log
from vmferry.devices.fsm import MigCap, MigState
from vmferry.devices.stream import DeviceStreamError
from vmferry.errors import MigrationError, StreamError
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.codec import DEVD, DEVD_HEAD, PHASE_PRECOPY, PHASE_STOP_COPY
from vmferry.migration.migratable import Pending
from vmferry.migration.stream import StreamWriter

CHUNK = 1 << 20  # one DEVD section: QEMU reads device data 1 MiB at a time
# Pre-copy data per device per round. QEMU reads 1 MiB per device per iteration; a vGPU's
# VRAM share of gigabytes would then take thousands of rounds, so vmferry reads more.
ROUND_BUDGET = 256 << 20

log = logging.getLogger(__name__)


@dataclass
class DeviceStats:
    name: str
    tracking: str
    precopy_bytes: int = 0
    stop_copy_bytes: int = 0
    stop_copy_ms: float = 0.0
    dma_dirty_pages: int = 0  # pages reported dirty by DMA tracking, all syncs

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dirty-tracking": self.tracking,
            "precopy-bytes": self.precopy_bytes,
            "stop-copy-bytes": self.stop_copy_bytes,
            "stop-copy-time": round(self.stop_copy_ms, 3),
            "dma-dirty-pages": self.dma_dirty_pages,
        }


def blockers(devices: list[DeviceModel]) -> list[str]:
    """Why a device cannot migrate at all (QEMU calls these migration blockers)."""
    out = []
    for d in devices:
        if not d.caps & MigCap.STOP_COPY:
            out.append(f"{d.name} does not support migration (no STOP_COPY)")
        if d.options.get("x-migratable", "on") == "off":
            out.append(f"{d.name} is marked not migratable")
    return out


@dataclass
class SourceDevices:
    """All the VM's devices as one Migratable (migratable.py), fanned out to each."""

    devices: list[DeviceModel]
    stats: list[DeviceStats] = field(default_factory=list)
    # Each device's DMA dirty log: the device layer knows how it is tracked, not the engine.
    logs: list[DmaDirtyLog] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.logs = [dma_dirty_log(d) for d in self.devices]
        self.stats = [
            DeviceStats(d.name, lg.mode.value)
            for d, lg in zip(self.devices, self.logs, strict=True)
        ]

    @property
    def transferred(self) -> int:
        return sum(s.precopy_bytes + s.stop_copy_bytes for s in self.stats)

    def identities(self) -> list[dict[str, Any]]:
        return [d.identity.to_dict() for d in self.devices]

    # ---- the Migratable contract (the names the round loop uses for every part)
    @property
    def name(self) -> str:
        return "devices"

    def start_dirty_tracking(self) -> None:
        """DMA dirty logs on, and PRE_COPY (the device tracks its own state from here)."""
        self.start()

    def stop_dirty_tracking(self) -> None:
        self.stop_tracking()

    def save_precopy(self, writer: StreamWriter) -> int:
        return self.send_precopy(writer)

    def save_final(self, writer: StreamWriter) -> int:
        return self.stop_and_copy(writer)

    # ---- set-up
    def start(self) -> None:
        for d, lg in zip(self.devices, self.logs, strict=True):
            lg.start()
            if d.caps & MigCap.PRE_COPY:
                d.set_state(MigState.PRE_COPY)

    # ---- every sync
    def collect_dirty(self, into: DirtyBitmap) -> None:
        """Merge what device DMA dirtied since the last sync (KVM's log cannot see it)."""
        for lg, st in zip(self.logs, self.stats, strict=True):
            before = into.count()
            lg.collect(into)
            st.dma_dirty_pages += into.count() - before

    def send_precopy(self, writer: StreamWriter) -> int:
        """Up to ROUND_BUDGET of pre-copy data per device, 1 MiB per section; returns
        bytes sent."""
        sent = 0
        for i, (d, st) in enumerate(zip(self.devices, self.stats, strict=True)):
            if d.state not in (MigState.PRE_COPY, MigState.PRE_COPY_P2P):
                continue
            budget = ROUND_BUDGET
            while budget > 0:
                data = d.read_data(min(budget, CHUNK))
                if not data:  # None: nothing now, more may come later
                    break
                writer.section(DEVD, [DEVD_HEAD.pack(i, PHASE_PRECOPY), data])
                st.precopy_bytes += len(data)
                sent += len(data)
                budget -= len(data)
        return sent

    def pending(self) -> Pending:
        """Device bytes still to send — pre-copy left plus the stop-copy estimates — and
        the initial bytes not yet sent. A device that cannot estimate counts as huge."""
        total = initial = 0
        for d in self.devices:
            if d.state in (MigState.PRE_COPY, MigState.PRE_COPY_P2P):
                ini, dirty = d.precopy_info()
                initial += ini
                total += ini + dirty
            total += d.stop_copy_size()
        return Pending(total, initial)

    # ---- switchover
    def stop_and_copy(self, writer: StreamWriter) -> int:
        """All devices quiesce (P2P) first, then each stops and its state is read out."""
        for d in self.devices:
            d.set_state(
                MigState.PRE_COPY_P2P
                if d.state is MigState.PRE_COPY and d.caps & MigCap.P2P
                else _quiesced(d)
            )
        sent = 0
        for i, (d, st) in enumerate(zip(self.devices, self.stats, strict=True)):
            t0 = time.monotonic()
            d.set_state(MigState.STOP_COPY)
            while data := d.read_data(CHUNK):
                writer.section(DEVD, [DEVD_HEAD.pack(i, PHASE_STOP_COPY), data])
                st.stop_copy_bytes += len(data)
                sent += len(data)
            st.stop_copy_ms = (time.monotonic() - t0) * 1e3
        return sent

    # ---- afterwards
    def stop_tracking(self) -> None:
        for lg in self.logs:
            lg.stop()

    def rollback(self) -> None:
        """Back to RUNNING (reset if the device cannot get there): the VM goes on here."""
        for d in self.devices:
            try:
                d.set_state(MigState.RUNNING)
            except DeviceError as e:
                log.warning("%s could not return to RUNNING (%s); resetting it", d.name, e)
                d.reset()
        self.stop_tracking()

    def release(self) -> None:
        """The destination runs the VM now: stop the devices here (outside the downtime)."""
        for d in self.devices:
            try:
                d.set_state(MigState.STOP)
            except DeviceError as e:
                log.warning("%s: %s", d.name, e)
        self.stop_tracking()


def _quiesced(d: DeviceModel) -> MigState:
    return MigState.RUNNING_P2P if d.caps & MigCap.P2P else MigState.STOP


class DestinationDevices:
    """The destination's devices: checked at set-up, fed their streams, committed."""

    def __init__(self, devices: list[DeviceModel]) -> None:
        self.devices = devices

    def check_compatible(self, source: list[dict[str, Any]]) -> None:
        if len(source) != len(self.devices):
            raise MigrationError(
                f"the source has {len(source)} devices, this VM {len(self.devices)}"
            )
        for d, ident in zip(self.devices, source, strict=True):
            try:
                theirs = DeviceIdentity.from_dict(ident)
            except (KeyError, TypeError, ValueError) as e:
                raise StreamError(f"CONF section: device identity is malformed: {e!r}") from e
            why = theirs.incompatibility(d.identity)
            if why:
                raise MigrationError(f"device {d.name} is incompatible: {why}")

    def begin(self) -> None:
        for d in self.devices:
            d.set_state(MigState.RESUMING)

    def load(self, record: bytes) -> None:
        """Loadable (migratable.py): one DEVD payload."""
        self.write(record)

    def write(self, payload: bytes) -> None:
        """One DEVD payload; the caller adds which section it was to an error."""
        if len(payload) < DEVD_HEAD.size:
            raise StreamError(f"{len(payload)} bytes is too short for a device index and phase")
        index, phase = DEVD_HEAD.unpack_from(payload)
        if index >= len(self.devices) or phase not in (PHASE_PRECOPY, PHASE_STOP_COPY):
            raise StreamError(f"it names device {index}, phase {phase}: no such device or phase")
        try:
            self.devices[index].write_data(payload[DEVD_HEAD.size :])
        except DeviceStreamError as e:
            raise StreamError(str(e)) from e

    def commit(self) -> None:
        """RESUMING → STOP (each device checks its stream is complete and consistent),
        then RUNNING_P2P: all that can fail happens before the source hands over."""
        for d in self.devices:
            try:
                d.set_state(MigState.STOP)
                d.set_state(_quiesced(d))
            except DeviceError as e:
                raise MigrationError(f"device {d.name} refused its state: {e}") from e

    def start(self) -> None:
        """The last arc, after the hand-over: the VM must run here now, so a device that
        cannot start is reset rather than leaving the VM nowhere."""
        for d in self.devices:
            try:
                d.set_state(MigState.RUNNING)
            except DeviceError as e:
                log.warning("%s could not start (%s); resetting it", d.name, e)
                d.reset()

    # ---- after the resume, while the post-resume audit runs
    def hold_output(self) -> None:
        """``x-verify-hold-output``, just before the guest starts here: what the devices
        send outside the VM (a VF's transmit) is held until the audit's verdict."""
        for d in self.devices:
            d.gate_output(OutputGate.HOLD)

    def release_output(self) -> None:
        """The audit passed: what was held goes out, in order, and nothing waits now."""
        for d in self.devices:
            d.gate_output(OutputGate.RELEASE)

    def drop_output(self) -> None:
        """The audit failed and the VM goes back to the source: the devices stop here
        (what TX still had is drained into the hold) and nothing held ever goes out."""
        self.stop()
        for d in self.devices:
            d.gate_output(OutputGate.DROP)

    def stop(self) -> None:
        """The audit failed: every device stops here, with or without a hold, before the
        source resumes. A stopped VF takes no more frames (they wait in its port, and the
        source's announce hands them back) and sends no more announces, so its MAC moves
        back to the source and stays there."""
        for d in self.devices:
            try:
                d.set_state(MigState.STOP)
            except DeviceError as e:
                log.warning("%s could not stop after a failed audit: %s", d.name, e)

    def output_figures(self) -> list[dict[str, Any]]:
        """Per device that held output: frames held, released, dropped (a rollback) and
        pushed out over the bound (hyphenated, as the report's device figures are)."""
        out = []
        for d in self.devices:
            figures = {k: v for k, v in d.stats.items() if k.startswith("output_")}
            if figures:
                out.append({"name": d.name} | {k.replace("_", "-"): v for k, v in figures.items()})
        return out

    def close(self) -> None:
        for d in self.devices:
            d.close()


__all__ = ["PAGE_SIZE", "DestinationDevices", "SourceDevices", "blockers"]
