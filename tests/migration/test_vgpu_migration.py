"""gpujob on a vGPU, live-migrated mid-job in every DMA dirty-tracking mode, with and
without VRAM pre-copy; untracked device writes are caught; an mdev UUID attaches."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, vmferry
from tests.migration.inprocess import Outcome, migrate_running, result_of
from vmferry.controller import VmController
from vmferry.devices.fsm import MigState
from vmferry.devices.vgpu import mdev
from vmferry.devices.vgpu.registers import COMPLETED
from vmferry.machine import Machine, MachineConfig, run_to_exit

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

# ~3 s of GPU work at 400 command buffers/s: the migration lands mid-job.
ARGS = "seed=5 rounds=1200 ws=8M rate=400"
REF_ARGS = "seed=5 rounds=1200 ws=8M"  # rate only paces: RESULT is the same
MEMORY = 128 << 20
VGPU = "vgpu,type=vgpu-4,vram=128M"
PROGRESS = 128 + 1 + 7 * 50  # the initial fill of 8 MiB in 64 KiB blocks, then 50 rounds
_reference: dict[str, str] = {}


@pytest.fixture(autouse=True)
def mdev_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VMFERRY_STATE_DIR", str(tmp_path / "state"))
    yield
    assert not mdev.list_instances(), "a transient vGPU outlived its VM"


def config(device: str, args: str = ARGS) -> MachineConfig:
    return MachineConfig(memory=MEMORY, image="gpujob", cmdline=args, devices=(device,))


def reference() -> str:
    if "r" not in _reference:
        out = io.BytesIO()
        with Machine.boot(config(VGPU, REF_ARGS), serial=out) as m:
            assert run_to_exit(m, 60).code == 0, out.getvalue()
        r = result_of(out)
        assert r is not None
        _reference["r"] = r
    return _reference["r"]


def migrate(device: str, after_s: float = 0.2) -> Outcome:
    src_out = io.BytesIO()
    m = Machine.boot(config(device), serial=src_out)
    m.start()
    # Into the job proper (GGTT programmed, VRAM filled, rounds running), however loaded
    # this machine is: only then does every kind of device write happen.
    deadline = time.monotonic() + 30
    while m.devices[0].mmio_read(COMPLETED, 8) < PROGRESS:
        assert time.monotonic() < deadline and m.exit is None, "gpujob made no progress"
        time.sleep(0.01)
    assert m.wait(after_s) is None, "the guest ended before the migration"
    return migrate_running(m, src_out)


def finish(o: Outcome) -> None:
    o.finish()


@pytest.mark.parametrize(
    "options",
    ["dirty=iommu", "dirty=device", "dirty=mediated", "dirty=none", "dirty=mediated,precopy=off"],
)
def test_gpujob_migrates_mid_job_intact(options: str) -> None:
    o = migrate(f"{VGPU},{options}")
    try:
        st = o.source.stats
        assert st.status == "completed", st.error
        assert st.verify.status == "passed"
        assert o.dest is not None and o.dest.verify.status == "passed"
        assert st.device_transferred >= 32 << 20, "the VRAM share did not move"
        dev = o.source.devices.stats[0]
        assert dev.dma_dirty_pages > 0, "no device write to guest RAM was tracked"
        if "precopy=off" in options:
            assert dev.precopy_bytes == 0 and dev.stop_copy_bytes >= 32 << 20
        else:
            assert dev.precopy_bytes >= 32 << 20, "VRAM was not pre-copied"
            assert dev.stop_copy_bytes < 8 << 20, "most of VRAM moved in the downtime"
        ex = o.dest.machine.wait(60)
        assert ex is not None and ex.code == 0, o.dest_out.getvalue()[-2000:]
        assert result_of(o.dest_out) == reference()
        assert result_of(o.source_out) is None, "the source ran the guest to its end too"
    finally:
        finish(o)


def test_untracked_device_writes_are_caught_and_the_source_runs_on() -> None:
    o = migrate(f"{VGPU},dirty=broken")
    try:
        st = o.source.stats
        assert st.status == "failed"
        assert "verification failed" in st.error
        assert o.source_machine.wait(60) is not None
        assert result_of(o.source_out) == reference()
    finally:
        finish(o)


def test_a_vgpu_created_by_uuid_runs_gpujob_and_is_released() -> None:
    inst = mdev.create(None, "vgpu-4", vram=64 << 20)
    out = io.BytesIO()
    cfg = config(f"vgpu,uuid={inst.uuid}", "seed=2 rounds=50")
    with Machine.boot(cfg, serial=out) as m:
        assert [i.holders for i in mdev.list_instances()] != [[]]
        assert run_to_exit(m, 60).code == 0, out.getvalue()
    assert result_of(out) is not None
    assert [i.holders for i in mdev.list_instances()] == [[]]
    mdev.remove(inst.uuid)


# ---- one vGPU, two processes on one host


def _vm(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _holders(uuid: str) -> list[int]:
    return next(i.holders for i in mdev.list_instances() if i.uuid == uuid)


def _until(what: str, cond: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {what} within 30 s"
        time.sleep(0.02)


def test_a_second_vm_cannot_attach_a_vgpu_in_use() -> None:
    inst = mdev.create(None, "vgpu-4", vram=128 << 20)
    device = f"vgpu,uuid={inst.uuid}"
    first = _vm("run", "gpujob", "--memory", "128M", "--device", device, "--", ARGS)
    try:
        _until("holder", lambda: _holders(inst.uuid) == [first.pid], first)
        second = vmferry("run", "gpujob", "--memory", "128M", "--device", device, "--", ARGS)
        assert second.returncode == 125, second.stderr
        assert second.stdout == b"", "the second guest ran"
        assert second.stderr.strip().splitlines() == [
            f"vmferry: error: vGPU {inst.uuid} is in use by process {first.pid}: a second "
            "VM cannot attach it (only a migration of that VM can take it over)"
        ]
        assert _holders(inst.uuid) == [first.pid]
    finally:
        first.kill()
        first.wait()
    assert _holders(inst.uuid) == []  # the dead holder is pruned
    mdev.remove(inst.uuid)


def test_a_vgpu_vm_migrates_between_two_processes_on_one_host() -> None:
    """The destination takes the second place on the vGPU while the source holds it."""
    inst = mdev.create(None, "vgpu-4", vram=128 << 20)
    qmp = f"/tmp/vmferry-test-{os.getpid()}-{uuidlib.uuid4().hex[:8]}.qmp"
    dst = _vm("run", "--incoming", "tcp:127.0.0.1:0")
    src = _vm(
        "run", "gpujob", "--memory", "128M", "--device", f"vgpu,uuid={inst.uuid}",
        "--qmp", f"unix:{qmp}", "--", ARGS,
    )  # fmt: skip
    try:
        assert dst.stderr is not None
        line = dst.stderr.readline().decode()
        assert "waiting for a migration on" in line, line
        port = int(line.rsplit(":", 1)[1])
        _until("QMP socket", lambda: Path(qmp).exists(), src)
        # QMP is bound before the VM boots, so the vGPU may be attached a moment later.
        _until("the source holding the vGPU", lambda: _holders(inst.uuid) == [src.pid], src)
        mig = vmferry("migrate", "--qmp", qmp, f"tcp:127.0.0.1:{port}")
        assert mig.returncode == 0, mig.stderr
        assert src.wait(30) == 0
        out, err = dst.communicate(timeout=60)
        assert dst.returncode == 0, err
        assert result_of(io.BytesIO(out)) == reference()
    finally:
        src.kill()
        dst.kill()
        src.wait()
        dst.wait()
    assert _holders(inst.uuid) == []
    mdev.remove(inst.uuid)


def test_cont_after_a_migration_to_a_file_runs_the_vgpu_again(tmp_path: Path) -> None:
    """The vGPU stopped for the save goes back to RUNNING, and gpujob ends with the
    reference RESULT here; the file restores to it too."""
    src_out = io.BytesIO()
    m = Machine.boot(config(VGPU), serial=src_out)
    try:
        m.start()
        deadline = time.monotonic() + 30
        while m.devices[0].mmio_read(COMPLETED, 8) < PROGRESS:
            assert time.monotonic() < deadline and m.exit is None, "gpujob made no progress"
            time.sleep(0.01)
        controller = VmController(m)
        state = tmp_path / "vm.state"
        controller.migrate(f"file:{state}")
        mig = controller.migration
        assert mig is not None and mig.wait(60)
        assert mig.stats.status == "completed", mig.stats.error
        states = [m.devices[0].state]  # stopped for the save
        controller.cont()
        assert controller.run_state() == "running"
        states.append(m.devices[0].state)
        assert states == [MigState.STOP, MigState.RUNNING]
        ex = m.wait(60)
        assert ex is not None and ex.code == 0, (ex, src_out.getvalue())
        assert result_of(src_out) == reference()
    finally:
        m.close()
    restored = vmferry("run", "--incoming", f"file:{state}")
    assert restored.returncode == 0, restored.stderr
    assert restored.result == reference()
