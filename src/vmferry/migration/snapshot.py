"""A whole machine through the stream: config, RAM, vCPU state, devices, end marker.

The save file and the last part of a live migration are the same sections, so this module
serves ``--save-after FILE``, ``--incoming file:FILE`` and the migration engine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import StreamError, VmferryError
from vmferry.machine.config import MachineConfig
from vmferry.machine.machine import Machine
from vmferry.machine.state import MachineState, VcpuState
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.ram import RamReceiver, RamStats, send_pages
from vmferry.migration.stream import CONF, CPUS, DEVS, END, RAM, StreamReader, StreamWriter
from vmferry.migration.transport import FdSink, FdSource


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def write_config(writer: StreamWriter, config: MachineConfig) -> None:
    writer.section(CONF, [_json({"config": config.to_dict()})])


def write_cpu_state(writer: StreamWriter, state: MachineState) -> None:
    writer.section(
        CPUS, [_json({"clock": state.clock.hex(), "vcpus": [v.to_dict() for v in state.vcpus]})]
    )


def write_devices_and_end(writer: StreamWriter, devices: list[dict[str, Any]]) -> None:
    writer.section(DEVS, [_json(devices)])
    writer.section(END, [])


def write_snapshot(writer: StreamWriter, machine: Machine, state: MachineState) -> RamStats:
    """A paused machine, whole: only populated RAM is read; zero pages go as flags."""
    write_config(writer, state.config)
    stats = send_pages(writer, machine.memory, machine.memory.resident_pages())
    write_cpu_state(writer, state)
    write_devices_and_end(writer, [])
    return stats


def _decode_json(reader: StreamReader, payload: bytes, what: str) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StreamError(f"section #{reader.seq - 1} {what} is not valid JSON: {e}") from e


@dataclass
class LoadedSnapshot:
    state: MachineState
    memory: GuestMemory
    devices: list[dict[str, Any]] = field(default_factory=list)
    ram: RamStats = field(default_factory=RamStats)


def read_snapshot(reader: StreamReader) -> LoadedSnapshot:
    """Read a complete stream into fresh guest memory; every section is checked.

    Nothing is started here: a caller builds the machine only from a stream that was read
    to its END section without error.
    """
    hdr, h = reader.next_section()
    conf = _decode_json(reader, reader.read_payload(hdr, h), "CONF")
    try:
        config = MachineConfig.from_dict(conf["config"])
    except (KeyError, TypeError, VmferryError) as e:
        raise StreamError(f"section #0 CONF holds no usable machine config: {e}") from e
    memory = GuestMemory(config.memory)
    try:
        receiver = RamReceiver(memory)
        cpu: dict[str, Any] | None = None
        devices: list[dict[str, Any]] = []
        while True:
            hdr, h = reader.next_section()
            if hdr.tag == RAM:
                receiver.load(reader, hdr, h)
            elif hdr.tag == CPUS:
                cpu = _decode_json(reader, reader.read_payload(hdr, h), "CPUS")
            elif hdr.tag == DEVS:
                devices = _decode_json(reader, reader.read_payload(hdr, h), "DEVS")
            elif hdr.tag == END:
                reader.read_payload(hdr, h)
                break
        assert cpu is not None  # the section grammar puts CPUS before END
        try:
            vcpus = [VcpuState.from_dict(v) for v in cpu["vcpus"]]
            clock = bytes.fromhex(cpu["clock"])
        except (KeyError, TypeError, ValueError) as e:
            raise StreamError(f"CPUS section is malformed: {e!r}") from e
        if [v.index for v in vcpus] != list(range(config.vcpus)):
            raise StreamError(
                f"CPUS section has vCPUs {[v.index for v in vcpus]}, config says {config.vcpus}"
            )
        if not isinstance(devices, list):
            raise StreamError("DEVS section is not a list")
        state = MachineState(config=config, clock=clock, vcpus=vcpus)
        return LoadedSnapshot(state=state, memory=memory, devices=devices, ram=receiver.stats)
    except BaseException:
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
    except BaseException:
        sink.close()
        os.unlink(tmp)
        raise
    sink.close()
    os.replace(tmp, path)
    return stats


def load_from_file(path: str) -> LoadedSnapshot:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StreamError(f"cannot open saved state {path}: {e.strerror}") from e
    source = FdSource(fd, name=path)
    try:
        return read_snapshot(StreamReader(source))
    finally:
        source.close()
