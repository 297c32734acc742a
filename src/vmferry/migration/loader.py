"""Loading a stream (and its extra channels) into fresh guest memory, checking everything.

Shared by ``--incoming file:`` and ``--incoming tcp:``: nothing here starts a guest, and
anything unexpected is a StreamError that names the section and what was wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmferry.devices.base import DeviceModel
from vmferry.devices.registry import create_devices
from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.machine.state import MachineState
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.codec import (
    ABRT,
    CEND,
    CONF,
    CPUS,
    DEVD,
    DEVS,
    END,
    RAM,
    ROUND,
    VRFY,
    Abandon,
    AbandonNotice,
    ChannelRecord,
    ConfigRecord,
    CpuStateRecord,
    DeviceSummary,
    RoundMarker,
    VerifyRecord,
    check_empty,
)
from vmferry.migration.devices import DestinationDevices
from vmferry.migration.metrics import VerifyResult
from vmferry.migration.ram import RamReceiver, RamStats
from vmferry.migration.stream import StreamReader
from vmferry.migration.verify import cpu_digest, mismatched_pages

log = logging.getLogger(__name__)


MAX_REASON = 500  # characters of the source's reason that are shown


def abandoned(notice: AbandonNotice | Abandon) -> MigrationError:
    """What the source said when it gave up (an ABRT section, or an ``abandon`` line once
    the stream has ended), as the destination's error."""
    reason = notice.reason[:MAX_REASON] or "no reason given"
    if notice.cancelled:
        return MigrationError(f"the source cancelled the migration ({reason})")
    return MigrationError(f"the source abandoned the migration: {reason}")


def read_head(reader: StreamReader) -> ConfigRecord:
    hdr, h = reader.next_section()
    assert hdr.tag == CONF  # the grammar allows nothing else first
    return ConfigRecord.decode(reader.read_payload(hdr, h), hdr.describe())


@dataclass
class LoadedStream:
    state: MachineState
    memory: GuestMemory
    devices: list[dict[str, Any]] = field(default_factory=list)
    ram: RamStats = field(default_factory=RamStats)
    verify: VerifyRecord | None = None
    written: DirtyBitmap | None = None
    rounds: int = 0
    device_models: list[DeviceModel] = field(default_factory=list)  # committed, stopped


def read_channel(reader: StreamReader, receiver: RamReceiver, mig_id: str, index: int) -> None:
    """An extra channel: CHAN naming this migration, RAM sections, CEND."""
    hdr, h = reader.next_section()
    chan = ChannelRecord.decode(reader.read_payload(hdr, h), hdr.describe())
    if chan != ChannelRecord(mig_id, index):
        raise StreamError(f"channel {index} belongs to another migration: {chan!r}")
    while True:
        hdr, h = reader.next_section()
        if hdr.tag == RAM:
            receiver.load(reader, hdr, h)
        else:
            assert hdr.tag == CEND
            check_empty(reader.read_payload(hdr, h), hdr.describe())
            return


def load_stream(
    head: ConfigRecord,
    main: StreamReader,
    memory: GuestMemory,
    channels: list[StreamReader] | None = None,
    devices: DestinationDevices | None = None,
    wake_main: Callable[[], None] | None = None,
    on_round: Callable[[], None] | None = None,
) -> LoadedStream:
    """Read the rest of the main stream, and the extra channels on threads, into memory;
    device state goes to ``devices`` (in RESUMING). ``wake_main`` ends a read blocked on
    the main stream (which may be idle while a channel fails); ``on_round`` is called at
    each RND marker (the stream cap counts per round)."""
    written = DirtyBitmap(memory.npages)
    receivers = [RamReceiver(memory, written) for _ in range(1 + len(channels or []))]
    errors: list[BaseException] = []
    threads = []
    for i, r in enumerate(channels or [], start=1):

        def run(r: StreamReader = r, i: int = i) -> None:
            try:
                read_channel(r, receivers[i], head.mig_id, i)
            except BaseException as e:
                errors.append(e)
                if wake_main is not None:
                    wake_main()

        t = threading.Thread(target=run, name=f"incoming-ch{i}", daemon=True)
        t.start()
        threads.append(t)

    cpu: CpuStateRecord | None = None
    summary = DeviceSummary()
    verify: VerifyRecord | None = None
    rounds = 0
    while True:
        if errors:
            raise errors[0]
        try:
            hdr, h = main.next_section()
            if hdr.tag == RAM:
                receivers[0].load(main, hdr, h)
            elif hdr.tag == ROUND:
                RoundMarker.decode(main.read_payload(hdr, h), hdr.describe())
                rounds += 1
                if on_round is not None:
                    on_round()
            elif hdr.tag == DEVD:
                payload = main.read_payload(hdr, h)
                if devices is None:
                    raise StreamError(f"{hdr.describe()}: device state for a VM without devices")
                try:
                    devices.write(payload)
                except StreamError as e:
                    raise StreamError(f"{hdr.describe()}: {e}") from e
            elif hdr.tag == CPUS:
                cpu = CpuStateRecord.decode(main.read_payload(hdr, h), hdr.describe())
            elif hdr.tag == DEVS:
                summary = DeviceSummary.decode(main.read_payload(hdr, h), hdr.describe())
            elif hdr.tag == VRFY:
                payload = main.read_payload(hdr, h)
                verify = VerifyRecord.decode(payload, hdr.describe(), memory.npages)
            elif hdr.tag == ABRT:
                raise abandoned(AbandonNotice.decode(main.read_payload(hdr, h), hdr.describe()))
            elif hdr.tag == END:
                check_empty(main.read_payload(hdr, h), hdr.describe())
                break
        except VmferryError:
            if errors:  # the channel's error is the cause; the main stream was woken
                raise errors[0] from None
            raise
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert cpu is not None  # the grammar puts CPUS before END
    state = cpu.machine_state(head.config, "the CPUS section")
    ram = RamStats()
    for rx in receivers:
        ram.add(rx.stats)
    return LoadedStream(
        state,
        memory,
        list(summary.devices),
        ram,
        verify,
        written,
        rounds,
    )


def check_loaded(loaded: LoadedStream, machine: Machine) -> VerifyResult:
    """Compare what arrived with the source's digests, before the guest may run."""
    rec = loaded.verify
    if rec is None:
        return VerifyResult(status="off", cpu_state="off")
    assert loaded.written is not None
    # Digests of RAM as it is now, not as it arrived: whatever wrote it since is caught too.
    bad = mismatched_pages(loaded.memory, rec, loaded.written)
    cpu_ok = cpu_digest(machine.save_state()) == rec.cpu
    result = VerifyResult(
        status="passed" if not bad and cpu_ok else "failed",
        pages_checked=int(rec.pages.size),
        mismatched_pages=bad,
        cpu_state="passed" if cpu_ok else "failed",
    )
    if bad:
        shown = ", ".join(str(p) for p in bad[:8])
        result.detail = f"guest RAM differs from the source's in pages {shown}"
        if len(bad) > 8:
            result.detail += f" and {len(bad) - 8} more"
    elif not cpu_ok:
        result.detail = "the loaded vCPU state differs from the source's"
    return result


def populate(memory: GuestMemory, ranges: Sequence[tuple[int, int]]) -> threading.Thread:
    """Pre-fault the RAM the source said holds data, in the background (fresh memory takes
    many times longer to receive into)."""

    def run() -> None:
        try:
            for a, b in ranges:
                memory.populate_range(a, b - a)
        except OSError as e:
            # Only a head start: pages not populated here fault in as data arrives.
            log.warning("pre-faulting guest RAM stopped: %s", e)

    t = threading.Thread(target=run, name="populate", daemon=True)
    t.start()
    return t


def open_devices(
    head: ConfigRecord, memory: GuestMemory, versions: dict[str, int] | None = None
) -> DestinationDevices:
    """The VM's devices, built here, checked against the source's, put in RESUMING; they
    take over the source's (a vGPU it still holds on this host may be shared)."""
    models = create_devices(head.config, memory, versions, incoming=True)
    devices = DestinationDevices(models)
    try:
        devices.check_compatible([d.to_dict() for d in head.devices])
        devices.begin()
    except BaseException:
        devices.close()
        raise
    return devices
