"""QEMU 7.2's runs of ``vmferry bench postcopy``: two QEMU processes on the churn image,
the source's RAM a /dev/shm file filled as vmferry's guest RAM is, driven over QMP.

Pre-copy: auto-converge (QEMU's defaults: throttle from 20 % up by 10 % to 99 %).
Post-copy: postcopy-ram on both sides, postcopy-blocktime on the destination (where
QEMU measures it), migrate-start-postcopy once round 0 has ended (the second dirty sync,
``dirty-sync-count`` 2: QEMU then switches at its next iteration). Both: the same cap as
``max-bandwidth`` and ``max-postcopy-bandwidth`` (QEMU's post-copy is uncapped
otherwise), the same downtime limit, multifd with the same channel count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from vmferry.bench import fill as bench_fill
from vmferry.bench import qemu as q
from vmferry.bench.migrate_procs import free_port
from vmferry.bench.postcopy_drive import Refused, Timeline, migrate, warm_up
from vmferry.bench.postcopy_plan import IMAGE, Case, PostcopyPlan
from vmferry.bench.postcopy_progress import SerialTail, phase_rates
from vmferry.bench.postcopy_results import Run
from vmferry.machine.images import resolve_image
from vmferry.qmp.backend import QmpError


def _caps(vm: q.QemuProcess, caps: dict[str, bool]) -> None:
    try:
        vm.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": k, "state": v} for k, v in caps.items()],
        )
    except QmpError as e:
        raise Refused(f"QEMU refused the capabilities {sorted(caps)}: {e}") from None


def configure(src: q.QemuProcess, dst: q.QemuProcess, case: Case, plan: PostcopyPlan) -> None:
    multifd = plan.channels > 1
    if case.postcopy:
        # 7.2's destination dies at the end of a multifd post-copy (yank.c:107, assertion
        # `QLIST_EMPTY(&entry->yankfns)'): post-copy runs on the main channel plus
        # postcopy-preempt's channel for the urgent pages, two connections as well.
        multifd = False
        pc = {"postcopy-ram": True, "postcopy-preempt": plan.channels > 1}
        _caps(dst, {"multifd": False, **pc, "postcopy-blocktime": True})
        _caps(src, {"multifd": False, **pc})
    else:
        _caps(dst, {"multifd": multifd})
        _caps(src, {"multifd": multifd, "auto-converge": True})
    for vm in (src, dst):
        params: dict[str, Any] = {
            "max-bandwidth": plan.cap,
            "max-postcopy-bandwidth": plan.cap,
            "downtime-limit": plan.downtime_limit_ms,
        }
        if multifd:
            params["multifd-channels"] = plan.channels
        vm.execute("migrate-set-parameters", **params)


def _run_of(case: Case, repeat: int, plan: PostcopyPlan, tl: Timeline, r0: float) -> Run:
    info = tl.last
    ram = info.get("ram", {})
    status = tl.status
    return Run(
        case.key,
        repeat,
        status,
        memory=plan.memory,
        total_ms=float(info.get("total-time", math.nan)),
        downtime_ms=float(info.get("downtime", math.nan)) if status == "completed" else math.nan,
        round0_rate=r0,
        rounds=int(ram.get("dirty-sync-count", 0)),
        transferred=int(ram.get("transferred", 0)),
        throttle_pct=tl.max_throttle,
        switch_ms=tl.switch_ms,
        requests=int(ram.get("postcopy-requests", 0)),
        postcopy_bytes=int(ram.get("postcopy-bytes", 0)),
        error=tl.error or str(info.get("error-desc", "")),
    )


def _blocktime(dst: q.QemuProcess) -> float:
    """The destination's postcopy-blocktime (ms; QEMU keeps it after completion)."""
    info = dst.execute("query-migrate")
    value = info.get("postcopy-blocktime")
    return float(value) if value is not None else math.nan


def run_qemu(case: Case, repeat: int, plan: PostcopyPlan, workdir: Path) -> Run:
    image = resolve_image(IMAGE).with_suffix(".elf32")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    fill = shm / f"vmferry-bench-postcopy-{os.getpid()}-{plan.memory >> 20}M"
    try:
        bench_fill.write_fill_file(fill, plan.memory)
        return _run(case, repeat, plan, workdir, image, fill)
    finally:
        fill.unlink(missing_ok=True)


def _run(
    case: Case, repeat: int, plan: PostcopyPlan, workdir: Path, image: Path, fill: Path
) -> Run:
    src_g, dst_g = q.migration_pair(image, plan.memory, plan.cmdline, workdir, fill)
    port = free_port()
    with q.QemuProcess(dst_g) as dst, q.QemuProcess(src_g) as src:
        configure(src, dst, case, plan)
        dst.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")

        def due(info: dict[str, Any]) -> bool:
            return int(info.get("ram", {}).get("dirty-sync-count", 0)) >= 2

        with SerialTail([src_g.serial, dst_g.serial]) as tail:
            warm_up(tail, plan, lambda: src.proc.poll() is None)
            tl = migrate(src.qmp, f"tcp:127.0.0.1:{port}", tail, plan, case, due)
            samples = tail.samples()
        r0 = q.round0_rate(tl.polls)  # -1: no poll fell in round 0
        run = _run_of(case, repeat, plan, tl, r0 if r0 > 0 else math.nan)
        run.rates = phase_rates(samples, tl.before, tl.start, tl.end, tl.after, tl.postcopy_seen)
        if case.postcopy and run.status == "completed":
            run.blocktime_ms = _blocktime(dst)
    return run


__all__ = ["configure", "run_qemu"]
