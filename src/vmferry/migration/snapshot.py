"""A whole machine through the stream: config, RAM, vCPU state, devices, end marker.

The save file and the last part of a live migration are the same sections, so this module
serves ``--save-after FILE``, ``--incoming file:FILE`` and the migration engine.
"""

from __future__ import annotations

import os

from vmferry.errors import StreamError
from vmferry.machine.machine import Machine
from vmferry.machine.state import MachineState
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.codec import (
    CONF,
    CPUS,
    DEVS,
    END,
    ConfigRecord,
    CpuStateRecord,
    DeviceSummary,
)
from vmferry.migration.devices import SourceDevices
from vmferry.migration.loader import LoadedStream, load_stream, open_devices, populate, read_head
from vmferry.migration.ram import RamStats, send_pages
from vmferry.migration.receiver_machine import ReceiverAction, ReceiverEvent, ReceiverMachine
from vmferry.migration.source_machine import Target
from vmferry.migration.stream import StreamReader, StreamWriter
from vmferry.migration.transport import FdSink, FdSource

Re, Ra = ReceiverEvent, ReceiverAction


def write_config(writer: StreamWriter, record: ConfigRecord) -> None:
    writer.section(CONF, [record.encode()])


def write_cpu_state(writer: StreamWriter, state: MachineState) -> None:
    writer.section(CPUS, [CpuStateRecord.of(state).encode()])


def write_devices_and_end(writer: StreamWriter, devices: SourceDevices) -> None:
    """DEVS (each device's identity and figures, as a live migration sends it), END."""
    summary = DeviceSummary.of(devices.identities(), [s.to_dict() for s in devices.stats])
    writer.section(DEVS, [summary.encode()])
    writer.section(END, [])


def write_snapshot(writer: StreamWriter, machine: Machine, state: MachineState) -> RamStats:
    """A paused machine, whole: only populated RAM is read; zero pages go as flags.

    Devices stop first (their state goes out, and no DMA changes RAM after that); the
    machine cannot run on after a save."""
    devices = SourceDevices(machine.devices)
    # The RAM ranges that hold data let the reader pre-fault them before pages arrive.
    identities = tuple(d.identity for d in machine.devices)
    resident = tuple(machine.memory.data_ranges())
    write_config(writer, ConfigRecord(state.config, resident=resident, devices=identities))
    devices.stop_and_copy(writer)
    stats = send_pages(writer, machine.memory, machine.memory.resident_pages())
    write_cpu_state(writer, state)
    write_devices_and_end(writer, devices)
    return stats


def read_snapshot(reader: StreamReader, walk: ReceiverMachine | None = None) -> LoadedStream:
    """Read a complete stream into fresh guest memory; every section is checked.

    The restore's walk (Target.FILE) through the same sections as a live destination's,
    up to its verification: nothing is started here, and a caller builds the machine only
    from a stream that was read to its END section without error. ``walk``: the
    restore's (a new one if None), left in VERIFYING with VERIFY due.
    """
    walk = walk if walk is not None else ReceiverMachine(Target.FILE)
    walk.step(Re.START)  # REPORT_STATUS (nobody asks a restore), READ_SECTION: the CONF
    head = read_head(reader)
    walk.step(Re.CONF)  # SET_UP: RAM and devices for the VM the CONF describes
    memory = GuestMemory(head.config.memory)
    devices = None
    try:
        populate(memory, head.resident)
        devices = open_devices(head, memory)
        then = walk.step(Re.SET_UP)  # READ_SECTION: the section loop from here
        loaded = load_stream(head, reader, memory, devices=devices, walk=walk)
        assert then == (Ra.READ_SECTION,) and loaded.then == (Ra.VERIFY,), (then, loaded.then)
        return loaded
    except BaseException:
        if devices is not None:
            devices.close()
        memory.close()
        raise


def save_to_file(machine: Machine, path: str) -> RamStats:
    """Write a paused machine to ``path`` (replaced atomically: a failed save leaves none)."""
    state = machine.save_state()
    tmp = f"{path}.partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    sink = FdSink(fd)
    try:
        stats = write_snapshot(StreamWriter(sink), machine, state)
        os.fsync(fd)
        sink.close()
        os.replace(tmp, path)  # inside: a PATH that cannot be replaced leaves no partial
    except BaseException:
        sink.close()
        os.unlink(tmp)
        raise
    return stats


def load_from_file(path: str, walk: ReceiverMachine | None = None) -> LoadedStream:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StreamError(f"cannot open saved state {path}: {e.strerror}") from e
    source = FdSource(fd, name=path)
    try:
        size = os.fstat(fd).st_size
        # A file must be checksummed whole: a live section (page data outside its
        # checksum) is refused, and so is anything after the END section.
        loaded = read_snapshot(StreamReader(source, sealed=True), walk)
        if source.position != size:
            close_loaded(loaded)
            raise StreamError(
                f"{path} has {size - source.position} bytes after its END section at byte "
                f"{source.position} (corrupt file?)"
            )
        return loaded
    finally:
        source.close()


def close_loaded(loaded: LoadedStream) -> None:
    """Free what a loaded stream holds (its devices and RAM) when it will not run."""
    for d in loaded.device_models:
        d.close()
    loaded.memory.close()
