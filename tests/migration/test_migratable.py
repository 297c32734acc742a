"""The Migratable contract: RAM, the vCPUs and the devices answer the same questions,
and a round loop written only against it moves a running machine's state intact."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from vmferry.devices.registry import create_devices
from vmferry.errors import MigrationError
from vmferry.machine import Machine, MachineConfig
from vmferry.memory import DirtyBitmap, GuestMemory
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.codec import CPUS, DEVD, RAM
from vmferry.migration.devices import DestinationDevices, SourceDevices
from vmferry.migration.guest_ram import RamMigration
from vmferry.migration.migratable import (
    Loadable,
    Migratable,
    Pending,
    check_migratable,
    total_pending,
)
from vmferry.migration.ram import RamReceiver
from vmferry.migration.stream import StreamReader, StreamWriter
from vmferry.migration.transport import FdSink, FdSource
from vmferry.migration.vcpus import VcpuMigration

ANY = frozenset({RAM, DEVD, CPUS})
# The sections a part writes, in any order (no CONF: this stream has only the parts').
PARTS_GRAMMAR: dict[bytes | None, frozenset[bytes]] = {None: ANY, RAM: ANY, DEVD: ANY, CPUS: ANY}


def test_pending_adds_as_numbers_not_as_tuples() -> None:
    assert Pending(10, 4).plus(Pending(5)) == Pending(15, 4)
    assert Pending(3) == Pending(3, 0)
    dev, ram = Pending(7, 2), Pending(5)
    dev_bytes, dev_initial = dev  # the engine unpacks a device Pending as before
    assert (dev_bytes, dev_initial) == (7, 2)
    assert ram.bytes == 5 and ram.initial_bytes == 0


def test_check_migratable_names_what_a_part_lacks() -> None:
    class HalfDone:
        name = "half"

        def pending(self) -> Pending:
            return Pending(0)

    with pytest.raises(TypeError, match="start_dirty_tracking, stop_dirty_tracking"):
        check_migratable(HalfDone())


def test_check_migratable_refuses_an_impossible_pending() -> None:
    class Liar:
        name = "liar"

        def start_dirty_tracking(self) -> None: ...
        def stop_dirty_tracking(self) -> None: ...
        def collect_dirty(self, into: DirtyBitmap) -> None: ...
        def save_precopy(self, writer: StreamWriter) -> int:
            return 0

        def save_final(self, writer: StreamWriter) -> int:
            return 0

        def pending(self) -> Pending:
            return Pending(1, 2)  # more initial bytes than bytes

    with pytest.raises(TypeError, match="liar: pending"):
        check_migratable(Liar())


@pytest.mark.kvm
@pytest.mark.slow
def test_a_round_loop_over_the_contract_moves_ram_devices_and_vcpus(tmp_path: Path) -> None:
    config = MachineConfig(
        memory=64 << 20,
        image="memtouch",
        cmdline="wss=8M pattern=random rounds=1000000 seed=5",
        devices=("dmaengine,dirty=device,x-dma-log-page=2M",),
    )
    m = Machine.boot(config)
    dest_mem = GuestMemory(config.memory)
    dest_devices = DestinationDevices(create_devices(config, dest_mem, incoming=True))
    path = tmp_path / "parts.stream"
    try:
        m.start()
        time.sleep(0.2)
        ram, vcpus, devices = RamMigration(m), VcpuMigration(m), SourceDevices(m.devices)
        parts: list[Migratable] = [check_migratable(p) for p in (ram, vcpus, devices)]
        assert isinstance(dest_devices, Loadable) and isinstance(vcpus, Loadable)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        writer = StreamWriter(FdSink(fd))
        for p in parts:
            p.start_dirty_tracking()
        resident = m.memory.resident_pages().size
        assert ram.pending() == Pending(resident * PAGE_SIZE)
        assert total_pending(parts).bytes >= resident * PAGE_SIZE + vcpus.pending().bytes

        rounds_dirty = []
        for _ in range(3):  # pre-copy rounds: the guest runs and dirties RAM meanwhile
            sent = sum(p.save_precopy(writer) for p in parts)
            assert sent > 0 and ram.pending() == Pending(0)
            time.sleep(0.05)
            dirty = DirtyBitmap(m.memory.npages)
            for p in parts:
                p.collect_dirty(dirty)
            ram.schedule(dirty)
            rounds_dirty.append(dirty.count())
            assert ram.pending().bytes == dirty.count() * PAGE_SIZE
        assert all(n > 0 for n in rounds_dirty), "memtouch dirtied nothing between rounds"
        assert vcpus.save_precopy(writer) == 0

        m.pause()  # the stop-and-copy: devices first (no DMA after), then the last pages
        assert devices.save_final(writer) > 0
        dirty = DirtyBitmap(m.memory.npages)
        for p in parts:
            p.collect_dirty(dirty)
        ram.schedule(dirty)
        ram.save_final(writer)
        assert vcpus.save_final(writer) > 0 and vcpus.pending() == Pending(0)
        for p in parts:
            p.stop_dirty_tracking()
        writer.sink.close()

        reader = StreamReader(FdSource(os.open(path, os.O_RDONLY)), PARTS_GRAMMAR)
        receiver = RamReceiver(dest_mem)
        dest_devices.begin()
        cpus_sections = 0
        while reader.source.position < path.stat().st_size:
            hdr, h = reader.next_section()
            if hdr.tag == RAM:
                receiver.load(reader, hdr, h)
            elif hdr.tag == DEVD:
                dest_devices.load(reader.read_payload(hdr, h))
            else:
                reader.read_payload(hdr, h)
                cpus_sections += 1
        reader.source.close()
        dest_devices.commit()  # each device checks its stream is whole and consistent
        assert cpus_sections == 1
        assert np.array_equal(dest_mem.bytes, m.memory.bytes), "RAM differs after the loop"
        assert vcpus.saved is not None
        vcpus.load(vcpus.saved)  # the vCPU part loads what it saved
        vcpus.commit()
    finally:
        devices_here = SourceDevices(m.devices)
        devices_here.rollback()
        m.close()
        dest_devices.close()
        dest_mem.close()


def test_a_vcpu_part_with_nothing_loaded_refuses_to_commit() -> None:
    class NoMachine:
        def __init__(self) -> None:
            self.vcpus = [object(), object()]

    part = VcpuMigration(NoMachine())  # type: ignore[arg-type]
    assert part.pending().bytes > 0  # an estimate until the state is captured
    with pytest.raises(MigrationError, match="no vCPU state was loaded"):
        part.commit()
