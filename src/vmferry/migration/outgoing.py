"""What an outgoing migration is made of once its streams are open: RAM on the
channels, the vCPUs and the devices as Migratable parts, the rounds and the switchover
over them; and the set-up around it (the file target's checks, the CONF and CHAN
records).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from vmferry.errors import ConfigError
from vmferry.machine.machine import Machine
from vmferry.migration.codec import CHAN, CONF, ChannelRecord, ConfigRecord
from vmferry.migration.devices import SourceDevices
from vmferry.migration.figures import LiveFigures
from vmferry.migration.guest_ram import RamMigration
from vmferry.migration.multifd import MultifdRam, RamChannels
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.precopy import Parts, Precopy
from vmferry.migration.stream import StreamWriter
from vmferry.migration.switchover import AfterFinalSync, EventSink, StopCopy
from vmferry.migration.vcpus import VcpuMigration


def check_file_target(path: str) -> None:
    """A file: URI must name a file that can be created or replaced: refuse one in a
    missing or unwritable directory (or a directory itself) before anything starts."""
    target = Path(path)
    where = f"file:{path}"
    if target.is_dir():
        raise ConfigError(f"{where}: is a directory (give a file name)")
    parent = target.parent
    if not parent.exists():
        raise ConfigError(f"{where}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ConfigError(f"{where}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: directory {parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{where}: the file exists and is not writable")


def open_file_target(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def send_config(
    machine: Machine,
    writers: list[StreamWriter],
    *,
    verify: str,
    peer_timeout_ms: int,
    verify_seed: int = 0,
    hold_output: bool = False,
) -> str:
    """CONF on the main stream (the VM, its devices, what follows), CHAN on the others;
    the migration's id (post-copy's page channels name it too)."""
    mig_id = uuid.uuid4().hex
    setup = ConfigRecord(
        machine.config,
        mig_id,
        channels=len(writers),
        resident=tuple(machine.memory.data_ranges()),
        verify=verify,
        devices=tuple(d.identity for d in machine.devices),
        # The destination gives up on a silent source after as long as the source waits.
        peer_timeout_ms=peer_timeout_ms,
        verify_seed=verify_seed,
        hold_output=hold_output,
    )
    writers[0].section(CONF, [setup.encode()])
    for i, w in enumerate(writers[1:], start=1):
        w.section(CHAN, [ChannelRecord(mig_id, i).encode()])
    return mig_id


class Outgoing(NamedTuple):
    """One migration's moving parts, over its open streams (``writers[0]`` the main)."""

    writers: list[StreamWriter]
    channels: RamChannels
    parts: Parts
    precopy: Precopy
    stop_copy: StopCopy


def assemble(
    machine: Machine,
    writers: list[StreamWriter],
    migrating: tuple[RamMigration, VcpuMigration, SourceDevices],
    figures: LiveFigures,
    params: MigrationParameters,
    caps: MigrationCapabilities,
    *,
    to_file: bool,
    checkpoint: Callable[[], None],
    verify_seed: int,
    digest_pool: ThreadPoolExecutor,
    on_event: EventSink,
    verify_mode: str = "strict",
    after_final_sync: AfterFinalSync | None = None,
) -> Outgoing:
    ram, vcpus, devices = migrating
    channels = RamChannels(
        writers,
        ram,
        figures,
        compress=params.multifd_compression == "zstd",
        # Every byte of a file is checksummed (it may carry no digests to catch damage):
        # a running guest's pages are copied first, so what is hashed is what is written.
        sealed=to_file,
        max_bandwidth=params.max_bandwidth,
        checkpoint=checkpoint,
    )
    parts = Parts(MultifdRam(ram, channels), vcpus, devices, writers[0])
    stop_copy = StopCopy(
        machine,
        parts,
        figures,
        verify_seed=verify_seed if verify_mode != "off" else None,
        digest_pool=digest_pool,
        on_event=on_event,
        verify_mode=verify_mode,
        after_final_sync=after_final_sync,
    )
    precopy = Precopy(machine, parts, figures, params, caps)
    return Outgoing(writers, channels, parts, precopy, stop_copy)


__all__ = ["Outgoing", "assemble", "check_file_target", "open_file_target", "send_config"]
