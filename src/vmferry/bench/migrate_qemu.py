"""One QEMU run of a ``vmferry bench migrate`` case: two QEMU processes on the same
memtouch image, its RAM file filled as vmferry's guest RAM is, driven over QMP."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vmferry.bench import fill as bench_fill
from vmferry.bench import qemu as q
from vmferry.bench.migrate_plan import (
    BANNER,
    GUEST_END_TIMEOUT_S,
    START_TIMEOUT_S,
    Case,
    MigratePlan,
    Progress,
)
from vmferry.bench.migrate_procs import free_port, has, last_result, wait_for
from vmferry.bench.migrate_results import VmmRun
from vmferry.errors import VmferryError
from vmferry.machine.images import resolve_image
from vmferry.qmp.client import QmpProtocolError


def run_qemu(case: Case, plan: MigratePlan, workdir: Path, progress: Progress) -> VmmRun:
    image = resolve_image("memtouch").with_suffix(".elf32")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    fill = shm / f"vmferry-bench-fill-{os.getpid()}-{case.memory >> 20}M"
    # Written for each QEMU run and removed after it: QEMU's guest writes into it (it is
    # its RAM), and while vmferry runs it would be a third copy of the guest's RAM.
    progress(f"vs QEMU: {case.label}: writing the RAM fill {fill}")
    try:
        bench_fill.write_fill_file(fill, case.memory)
        return _run_qemu(case, plan, workdir, image, fill)
    finally:
        fill.unlink(missing_ok=True)


def _run_of(mig: q.QemuMigration) -> VmmRun:
    return VmmRun(
        "qemu",
        mig.status,
        mig.total_ms,
        mig.downtime_ms,
        stop_to_resume_ms=mig.stop_to_resume_ms,
        rounds=int(mig.info.get("ram", {}).get("dirty-sync-count", 0)),
        transferred=int(mig.info.get("ram", {}).get("transferred", 0)),
        setup_ms=mig.setup_ms,
        round0_rate=mig.round0_rate,
        error=mig.error,
    )


def _destination_end(run: VmmRun, dst: q.QemuProcess, dst_g: q.QemuGuest, stopped: bool) -> None:
    """The destination's guest runs to its RESULT (continued first if it came stopped)."""
    if stopped:
        # A `cont` while the destination still loads is dropped when the VM
        # arrives paused: wait until it has left "inmigrate".
        wait_for(
            "QEMU's destination to finish loading",
            lambda: dst.execute("query-status").get("status") != "inmigrate",
            q.QMP_TIMEOUT_S,
        )
        dst.execute("cont")
    code = dst.wait(GUEST_END_TIMEOUT_S)
    run.result = last_result(dst_g.serial)
    if code != 1:  # isa-debug-exit: (0 << 1) | 1
        run.error = f"QEMU destination exit status {code} (1 is the guest's 0)"


def _run_qemu(case: Case, plan: MigratePlan, workdir: Path, image: Path, fill: Path) -> VmmRun:
    w = case.workload
    src_g, dst_g = q.migration_pair(image, case.memory, plan.cmdline(case), workdir, fill)
    port = free_port()
    with q.QemuProcess(dst_g) as dst, q.QemuProcess(src_g) as src:
        for vm in (dst, src):
            q.configure(vm, plan.channels, plan.downtime_limit_ms)
        dst.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        wait_for(
            "the guest's first line under QEMU",
            lambda: has(src_g.serial, BANNER) or src.proc.poll() is not None,
            START_TIMEOUT_S,
        )
        time.sleep(w.delay_s)
        if w.stop_first:
            src.execute("stop")
        try:
            mig = q.migrate(src, dst, port, plan.timeout_s(case.memory), running=not w.stop_first)
        except (OSError, QmpProtocolError) as e:
            code = src.proc.poll()
            why = " (1: the guest ended first)" if code == 1 else ""
            raise VmferryError(
                f"QEMU's source went away during the migration ({e}; exit status "
                f"{code}{why}): {src.log()[-300:]}"
            ) from None
        run = _run_of(mig)
        if mig.status == "completed":
            _destination_end(run, dst, dst_g, w.stop_first)
    return run


__all__ = ["run_qemu"]
