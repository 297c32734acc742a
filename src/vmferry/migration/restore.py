"""``--incoming file:PATH``: a saved machine restored here, as a driver of the receiver's
table for files (Target.FILE): the same sections as a live destination's, then the
verification, then the start; no source to answer, nothing to wait for."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import BinaryIO

from vmferry.errors import MigrationError
from vmferry.kvm.system import DEFAULT_DEVICE
from vmferry.machine.machine import Machine
from vmferry.migration.devices import DestinationDevices
from vmferry.migration.loader import LoadedStream, check_loaded
from vmferry.migration.metrics import VerifyResult
from vmferry.migration.receiver_machine import ReceiverAction, ReceiverEvent, ReceiverMachine
from vmferry.migration.snapshot import close_loaded, load_from_file
from vmferry.migration.source_machine import Target

Re, Ra = ReceiverEvent, ReceiverAction


@dataclass
class Restored:
    machine: Machine  # running
    loaded: LoadedStream
    verify: VerifyResult
    seconds: float  # reading, checking and verifying the file


def restore_from_file(
    path: str, *, kvm_device: str = DEFAULT_DEVICE, serial: BinaryIO | None = None
) -> Restored:
    """Read ``path`` (every section checked), build the machine, verify it against the
    file's digests and start it. A file that fails any check starts nothing: what was
    built is closed and the error names the file."""
    t0 = time.perf_counter()
    walk = ReceiverMachine(Target.FILE)
    try:
        loaded = load_from_file(path, walk)  # it discards what it built if it fails
    except BaseException:
        if walk.allows(Re.ERROR):
            walk.step(Re.ERROR)
        raise
    try:
        machine = Machine.from_state(
            loaded.state, loaded.memory, kvm_device=kvm_device, serial=serial,
            devices=loaded.device_models,
        )  # fmt: skip
    except BaseException:
        close_loaded(loaded)
        walk.step(Re.ERROR)
        raise
    verify = check_loaded(loaded, machine)
    seconds = time.perf_counter() - t0
    passed = verify.status != "failed"
    for action in walk.step(Re.VERIFY_PASSED if passed else Re.VERIFY_FAILED):
        if action is Ra.DISCARD:
            machine.close()
        elif action is Ra.START_VM:
            DestinationDevices(machine.devices).start()  # RUNNING_P2P → RUNNING, then vCPUs
            machine.start()
    if not passed:
        raise MigrationError(f"{path}: verification failed: {verify.detail}")
    return Restored(machine, loaded, verify, seconds)


__all__ = ["Restored", "restore_from_file"]
