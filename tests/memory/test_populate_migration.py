"""A destination that cannot allocate guest RAM while it pre-faults fails the migration
with that reason, and the source's guest runs on to its reference result."""

from __future__ import annotations

import errno
import io

import pytest

from tests.conftest import RESULT_RE, vmferry
from tests.migration.inprocess import migrate_running
from vmferry.machine import Machine, MachineConfig
from vmferry.memory.guest_memory import GuestMemory

pytestmark = [pytest.mark.kvm, pytest.mark.slow]
ARGS = "wss=16M seed=5 rounds=40 rate=200"  # about 3 s
MIB = 1 << 20


def test_a_destination_out_of_memory_fails_the_migration_and_the_source_runs_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = vmferry("run", "memtouch", "--memory", "128M", "--", "wss=16M", "seed=5", "rounds=40")
    out = io.BytesIO()
    m = Machine.boot(MachineConfig(memory=128 << 20, image="memtouch", cmdline=ARGS), serial=out)
    m.start()
    assert m.wait(0.5) is None
    populate_range = GuestMemory.populate_range

    def short_of_memory(self: GuestMemory, offset: int, length: int) -> bool:
        if offset + length > 8 * MIB:  # the host runs out past the first 8 MiB
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return populate_range(self, offset, length)

    # Only the destination populates (the source's RAM is its running guest's).
    monkeypatch.setattr(GuestMemory, "populate_range", short_of_memory)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # the thread is on
    o = migrate_running(m, out)
    try:
        assert o.source.stats.status == "failed"
        assert "cannot allocate guest RAM at offset" in (o.source.stats.error or "")
        assert o.dest is None and o.dest_error is not None
        assert "cannot allocate guest RAM" in str(o.dest_error)
        assert m.wait(60) is not None  # the guest ran on at the source, to its end
        assert RESULT_RE.findall(out.getvalue()) == RESULT_RE.findall(ref.stdout)
    finally:
        m.close()
