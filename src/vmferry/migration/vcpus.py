"""The vCPUs as a Migratable: their state moves only with the VM stopped, and what they
write to RAM is in KVM's dirty log (RAM's part), so they track nothing themselves."""

from __future__ import annotations

from vmferry.errors import MigrationError
from vmferry.machine.machine import Machine
from vmferry.machine.state import MachineState
from vmferry.memory.dirty import DirtyBitmap
from vmferry.migration.migratable import Pending
from vmferry.migration.snapshot import write_cpu_state
from vmferry.migration.stream import StreamWriter

# KVM's state of one vCPU (registers, XSAVE area, MSRs, LAPIC) is a few KiB, doubled in
# the stream's text form: an estimate for the policy before the state is captured.
VCPU_STATE_ESTIMATE = 16 << 10


class VcpuMigration:
    """Source side: ``save_final`` captures the paused machine's vCPUs and writes them;
    destination side: ``load`` puts a captured state into this machine's vCPUs."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.saved: MachineState | None = None  # what save_final sent (for verification)
        self._loaded: MachineState | None = None

    @property
    def name(self) -> str:
        return "vcpus"

    def start_dirty_tracking(self) -> None:
        return  # nothing of theirs changes behind KVM's dirty log

    def stop_dirty_tracking(self) -> None:
        return

    def collect_dirty(self, into: DirtyBitmap) -> None:
        return  # their writes to RAM are in RAM's collect

    def pending(self) -> Pending:
        if self.saved is not None:
            return Pending(0)
        return Pending(VCPU_STATE_ESTIMATE * len(self.machine.vcpus))

    def save_precopy(self, writer: StreamWriter) -> int:
        return 0  # a running vCPU's state is stale as soon as it is read

    def save_final(self, writer: StreamWriter) -> int:
        before = writer.bytes_written
        self.saved = self.machine.save_state()  # refuses a machine that is not paused
        write_cpu_state(writer, self.saved)
        return writer.bytes_written - before

    def load(self, record: MachineState) -> None:
        self.machine.restore_cpu_state(record)
        self._loaded = record

    def commit(self) -> None:
        if self._loaded is None:
            raise MigrationError("no vCPU state was loaded: the stream had no CPUS section")
