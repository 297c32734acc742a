"""A destination that allocated its RAM before the migration (``--prealloc``) uses it when
the VM's size matches, and allocates anew when it does not."""

from __future__ import annotations

import io

import pytest

from tests.conftest import RESULT_RE, vmferry
from tests.migration.inprocess import migrate_running
from vmferry.machine import Machine, MachineConfig

pytestmark = [pytest.mark.kvm, pytest.mark.slow]
ARGS = "wss=16M seed=4 rounds=40 rate=200"  # about 3 s


@pytest.mark.parametrize("prealloc", [128 << 20, 64 << 20])
def test_preallocated_destination(prealloc: int) -> None:
    ref = vmferry("run", "memtouch", "--memory", "128M", "--", "wss=16M", "seed=4", "rounds=40")
    out = io.BytesIO()
    m = Machine.boot(MachineConfig(memory=128 << 20, image="memtouch", cmdline=ARGS), serial=out)
    m.start()
    assert m.wait(0.5) is None
    o = migrate_running(m, out, prealloc=prealloc)
    try:
        assert o.source.stats.status == "completed", o.source.stats.error
        assert o.dest is not None and o.dest.verify.status == "passed"
        assert o.dest.machine.memory.size == 128 << 20
        assert o.dest.machine.wait(60) is not None
        assert RESULT_RE.findall(o.dest_out.getvalue()) == RESULT_RE.findall(ref.stdout)
    finally:
        o.finish()
