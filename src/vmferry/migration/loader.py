"""Loading a stream (and its extra channels) into fresh guest memory, checking everything.

Shared by ``--incoming file:`` and ``--incoming tcp:``: nothing here starts a guest, and
anything unexpected is a StreamError that names the section and what was wrong.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import xxhash

from vmferry.devices.base import DeviceModel
from vmferry.devices.registry import create_devices
from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.machine.state import MachineState
from vmferry.memory.dirty import DirtyBitmap
from vmferry.memory.guest_memory import GuestMemory
from vmferry.memory.populate import Populator
from vmferry.migration.channel_readers import ChannelReaders
from vmferry.migration.codec import (
    CONF,
    Abandon,
    AbandonNotice,
    ConfigRecord,
    CpuStateRecord,
    DeviceSummary,
    OwedRecord,
    RoundMarker,
    VerifyRecord,
    check_empty,
)
from vmferry.migration.devices import DestinationDevices
from vmferry.migration.landing import LandingDigests
from vmferry.migration.metrics import VerifyResult
from vmferry.migration.ram import RamReceiver, RamStats
from vmferry.migration.receiver_machine import (
    ReceiverAction,
    ReceiverEvent,
    ReceiverMachine,
    section_event,
)
from vmferry.migration.source_machine import Target
from vmferry.migration.stream import SectionHeader, StreamReader
from vmferry.migration.verify import cpu_digest, mismatched_pages

log = logging.getLogger(__name__)
Re, Ra = ReceiverEvent, ReceiverAction


MAX_REASON = 500  # characters of the source's reason that are shown


class SourceAbandoned(MigrationError):
    """The source gave up and said so: ``event`` is how (an ABRT section, or an
    ``abandon`` line once the stream has ended)."""

    def __init__(self, message: str, event: ReceiverEvent) -> None:
        super().__init__(message)
        self.event = event


def abandoned(notice: AbandonNotice | Abandon) -> SourceAbandoned:
    """What the source said when it gave up, as the destination's error."""
    reason = notice.reason[:MAX_REASON] or "no reason given"
    event = Re.ABRT if isinstance(notice, AbandonNotice) else Re.ABANDON
    if notice.cancelled:
        return SourceAbandoned(f"the source cancelled the migration ({reason})", event)
    return SourceAbandoned(f"the source abandoned the migration: {reason}", event)


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
    landing: LandingDigests | None = None  # x-verify on: each page's digest as it landed
    # The rest of the step that finished the load, for the driver (VERIFY, in both tables).
    then: tuple[ReceiverAction, ...] = ()
    drain_ms: float = 0.0  # after END, waiting for the landing digests (in the downtime)
    owed: OwedRecord | None = None  # post-copy: the pages still to come after the resume


#: What the section loop carries out; any other action ends it (the driver's to perform).
LOADING_ACTIONS = frozenset(
    {
        Ra.READ_SECTION,
        Ra.LOAD_RAM,
        Ra.END_ROUND,
        Ra.LOAD_DEVICE_DATA,
        Ra.LOAD_CPU_STATE,
        Ra.LOAD_DEVICE_SUMMARY,
        Ra.LOAD_DIGESTS,
        Ra.LOAD_OWED,
        Ra.FINISH_LOAD,
    }
)


class SectionLoop:
    """The main stream's sections after CONF, read as the receiver's table directs: each
    header becomes the walk's event, and the actions it returns are carried out here
    until one is not a loading action (VERIFY: the stream is whole, the load finished).
    A failure is raised, never stepped: the driver turns it into its event."""

    def __init__(
        self,
        head: ConfigRecord,
        main: StreamReader,
        memory: GuestMemory,
        walk: ReceiverMachine,
        channels: Sequence[StreamReader] = (),
        devices: DestinationDevices | None = None,
        wake_main: Callable[[], None] | None = None,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        self.head, self.main, self.memory, self.walk = head, main, memory, walk
        self.devices = devices
        self.on_round = on_round
        self.written = DirtyBitmap(memory.npages)
        n = 1 + len(channels)
        # Each receiver refuses pages of another channel's blocks: channels share `written`.
        self.receivers = [RamReceiver(memory, self.written, i, n) for i in range(n)]
        self.landing = LandingDigests(memory, head.verify_seed) if head.verify == "on" else None
        for rx in self.receivers:
            rx.on_landed = None if self.landing is None else self.landing.landed
        self.cpu: CpuStateRecord | None = None
        self.summary = DeviceSummary()
        self.verify: VerifyRecord | None = None
        self.owed: OwedRecord | None = None
        self.rounds = 0
        self._section: tuple[SectionHeader, xxhash.xxh3_64] | None = None
        self.channels = ChannelReaders(channels, self.receivers[1:], head.mig_id, wake_main)

    def run(self, actions: tuple[ReceiverAction, ...] = (Ra.READ_SECTION,)) -> LoadedStream:
        """Carry out ``actions`` (what the step into LOADING asked for) and every step
        after them, until the load is finished; the landing digests are all taken then
        (or their worker stopped, if the load failed: the memory may be closed next)."""
        try:
            loaded = self._run(actions)
        except BaseException:
            if self.landing is not None:
                self.landing.close()
            raise
        if self.landing is not None:
            t0 = time.monotonic()
            try:
                self.landing.drain()
            finally:
                self.landing.close()
            loaded.drain_ms = (time.monotonic() - t0) * 1e3
        return loaded

    def _run(self, actions: tuple[ReceiverAction, ...]) -> LoadedStream:
        while True:
            event: ReceiverEvent | None = None
            for i, action in enumerate(actions):
                if action not in LOADING_ACTIONS:
                    return self._loaded(actions[i:])
                event = self._perform(action) or event
            if event is None:
                raise MigrationError(f"{self.walk.name}: no event after {actions!r}")
            actions = self.walk.step(event)

    def _perform(self, action: ReceiverAction) -> ReceiverEvent | None:
        try:
            self.channels.check()
            return self._ACTIONS[action](self)
        except VmferryError:
            if self.channels.errors:  # the channel's error is the cause; main was woken
                raise self.channels.errors[0] from None
            raise

    def _read_section(self) -> ReceiverEvent:
        hdr, h = self.main.next_section()
        self._section = (hdr, h)
        event = section_event(hdr.tag)
        if event is Re.ABRT:
            raise abandoned(AbandonNotice.decode(self._payload(), hdr.describe()))
        return event

    def _payload(self) -> bytes:
        assert self._section is not None
        hdr, h = self._section
        return self.main.read_payload(hdr, h)

    @property
    def _where(self) -> str:
        assert self._section is not None
        return self._section[0].describe()

    def _load_ram(self) -> None:
        assert self._section is not None
        self.receivers[0].load(self.main, *self._section)

    def _end_round(self) -> None:
        RoundMarker.decode(self._payload(), self._where)
        self.rounds += 1
        if self.on_round is not None:
            self.on_round()

    def _load_device_data(self) -> None:
        payload = self._payload()
        if self.devices is None:
            raise StreamError(f"{self._where}: device state for a VM without devices")
        try:
            self.devices.write(payload)
        except StreamError as e:
            raise StreamError(f"{self._where}: {e}") from e

    def _load_cpu_state(self) -> None:
        self.cpu = CpuStateRecord.decode(self._payload(), self._where)

    def _load_device_summary(self) -> None:
        self.summary = DeviceSummary.decode(self._payload(), self._where)

    def _load_digests(self) -> None:
        self.verify = VerifyRecord.decode(self._payload(), self._where, self.memory.npages)

    def _load_owed(self) -> None:
        if self.head.verify == "strict":
            # Strict checks all of RAM before the resume; post-copy sends some after it.
            raise StreamError(
                f"{self._where}: a post-copy switch in an x-verify strict stream (strict "
                "checks all of RAM before the resume, which post-copy sends after it)"
            )
        self.owed = OwedRecord.decode(self._payload(), self._where, self.memory.npages)

    def _finish_load(self) -> None:
        """END's (empty) payload, the channels joined, every device checking its state."""
        check_empty(self._payload(), self._where)
        self.channels.join()
        self.memory.stop_populating()  # all that was sent has landed
        if self.devices is not None:
            self.devices.commit()  # RESUMING → STOP: each device checks its state

    def _loaded(self, then: tuple[ReceiverAction, ...]) -> LoadedStream:
        assert self.cpu is not None  # the grammar puts CPUS before END
        ram = RamStats()
        for rx in self.receivers:
            ram.add(rx.stats)
        return LoadedStream(
            self.cpu.machine_state(self.head.config, "the CPUS section"),
            self.memory,
            list(self.summary.devices),
            ram,
            self.verify,
            self.written,
            self.rounds,
            [] if self.devices is None else self.devices.devices,
            self.landing,
            then,
            owed=self.owed,
        )

    _ACTIONS: Mapping[ReceiverAction, Callable[[SectionLoop], ReceiverEvent | None]] = (
        MappingProxyType(
            {
                Ra.READ_SECTION: _read_section,
                Ra.LOAD_RAM: _load_ram,
                Ra.END_ROUND: _end_round,
                Ra.LOAD_DEVICE_DATA: _load_device_data,
                Ra.LOAD_CPU_STATE: _load_cpu_state,
                Ra.LOAD_DEVICE_SUMMARY: _load_device_summary,
                Ra.LOAD_DIGESTS: _load_digests,
                Ra.LOAD_OWED: _load_owed,
                Ra.FINISH_LOAD: _finish_load,
            }
        )
    )


def loading_walk() -> ReceiverMachine:
    """A restore's walk with its CONF already read and set up: at the first section."""
    walk = ReceiverMachine(Target.FILE)
    for event in (Re.START, Re.CONF, Re.SET_UP):
        walk.step(event)
    return walk


def load_stream(
    head: ConfigRecord,
    main: StreamReader,
    memory: GuestMemory,
    channels: Sequence[StreamReader] | None = None,
    devices: DestinationDevices | None = None,
    wake_main: Callable[[], None] | None = None,
    on_round: Callable[[], None] | None = None,
    walk: ReceiverMachine | None = None,
) -> LoadedStream:
    """Read the rest of the main stream, and the extra channels on threads, into memory;
    device state goes to ``devices`` (in RESUMING; committed at END). ``wake_main`` ends
    a read blocked on the main stream; ``on_round`` is called at each RND marker (the
    stream cap counts per round). ``walk``: the receiver's, at LOADING (a restore's if
    None); it is left in VERIFYING, and the result's ``then`` says what is due next."""
    loop = SectionLoop(
        head,
        main,
        memory,
        walk if walk is not None else loading_walk(),
        channels or (),
        devices,
        wake_main,
        on_round,
    )
    return loop.run()


def check_loaded(loaded: LoadedStream, machine: Machine) -> VerifyResult:
    """Compare what arrived with the source's digests, before the guest may run."""
    rec = loaded.verify
    if rec is None:
        return VerifyResult(status="off", cpu_state="off")
    assert loaded.written is not None
    if loaded.landing is not None:
        # x-verify on: the pages the dirty log cannot vouch for, against what landed (the
        # rest is audited after the resume).
        bad = [int(p) for p in loaded.landing.differing(rec.pages, rec.digests)[:16]]
    else:
        # Digests of RAM as it is now, not as it arrived: whatever wrote it since is caught.
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


def populate(
    memory: GuestMemory, ranges: Sequence[tuple[int, int]], receivers: int = 1
) -> Populator:
    """Pre-fault the RAM the source said holds data, on a thread, ahead of the receivers
    (``receivers`` threads: with too few CPUs left it does not pay, and pages fault in as
    they land); it stops at the end of the load, or when RAM is discarded
    (memory/populate.py)."""
    return memory.populate_ahead(ranges, receivers=receivers)


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
