"""One vmferry run of a ``vmferry bench migrate`` case: its source process (``python -m
vmferry.bench.migrate source``) and a ``vmferry run --incoming`` destination, driven over
QMP as QEMU is; and the reference RESULT an undisturbed run prints."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from vmferry.bench import qemu as q
from vmferry.bench.migrate_plan import (
    BANNER,
    GIB,
    GUEST_END_TIMEOUT_S,
    POLL_S,
    REFERENCE_MEMORY,
    START_TIMEOUT_S,
    VMFERRY,
    Case,
    MigratePlan,
    Workload,
)
from vmferry.bench.migrate_procs import (
    Proc,
    free_port,
    has,
    last_result,
    vmferry_destination,
    wait_for,
)
from vmferry.bench.migrate_results import VmmRun
from vmferry.errors import VmferryError
from vmferry.qmp.client import QmpClient, QmpProtocolError


def reference_result(workload: Workload, cmdline: str, memory: int, workdir: Path) -> str:
    """RESULT of an undisturbed run. It depends on the parameters but not on ``rate`` nor
    the RAM size (see memtouch.c), so the reference runs unpaced in a small guest."""
    cmdline = re.sub(r"\brate=\d+", "rate=0", cmdline)
    serial = workdir / "reference.serial"
    serial.unlink(missing_ok=True)
    size = min(memory, max(REFERENCE_MEMORY, workload.min_memory))
    argv = [*VMFERRY, "run", "memtouch", "--memory", f"{size >> 20}M", "--serial", str(serial)]
    argv += ["--timeout", str(int(GUEST_END_TIMEOUT_S)), "--", *cmdline.split()]
    p = subprocess.run(argv, capture_output=True, timeout=GUEST_END_TIMEOUT_S + 30)
    if p.returncode != 0:
        raise VmferryError(f"reference run failed ({p.returncode}): {p.stderr.decode()[-500:]}")
    res = last_result(serial)
    if not res:
        raise VmferryError("the reference run printed no RESULT")
    return res


def _report_verify(rep: dict[str, Any]) -> dict[str, Any]:
    v = rep.get("verify")
    return dict(v) if isinstance(v, dict) else {}


def _verify_parameter(qmp: QmpClient) -> dict[str, Any]:
    """x-verify "on" where the source knows the parameter (two-phase verification); the
    capability alone (on by default) otherwise."""
    known = qmp.execute("query-migrate-parameters")
    return {"x-verify": "on"} if isinstance(known, dict) and "x-verify" in known else {}


def _configure(qmp: QmpClient, plan: MigratePlan) -> None:
    qmp.execute(
        "migrate-set-parameters",
        **{
            "multifd-channels": plan.channels,
            "downtime-limit": plan.downtime_limit_ms,
            "max-bandwidth": 0,  # vmferry's "unlimited"
            **_verify_parameter(qmp),
        },
    )
    qmp.execute(
        "migrate-set-capabilities",
        capabilities=[
            {"capability": "multifd", "state": plan.channels > 1},
            {"capability": "x-verify", "state": True},
        ],
    )


def _await_end(qmp: QmpClient, timeout: float) -> tuple[str, str]:
    """The migration's last status seen, and the bench's error (its cancel at the
    timeout); the source quits once it is over unless it completed."""
    status, error = "?", ""
    deadline = time.monotonic() + timeout
    try:
        while status not in q.DONE:
            if time.monotonic() > deadline:
                qmp.execute("migrate_cancel")
                error = f"not converged within {timeout:.0f} s"
                deadline = math.inf
            time.sleep(POLL_S)
            status = str(qmp.execute("query-migrate").get("status", "?"))
        if status != "completed":
            qmp.execute("quit")  # the source writes its report, then exits
    except (QmpProtocolError, OSError):
        pass  # the source exits once the VM runs on the destination
    return status, error


def _run_of(rep: dict[str, Any], status: str, error: str, timeout: float) -> VmmRun:
    """The run as the source's report tells it."""
    status = str(rep.get("status", status))
    if error and status == "completed":
        # Past the switchover a migration no longer cancels: it was converged.
        error = f"completed after the bench's cancel at {timeout:.0f} s (too late to cancel)"
    return VmmRun(
        "vmferry",
        status,
        float(rep.get("total-time", -1)),
        float(rep.get("downtime", -1)) if status == "completed" else -1.0,
        rounds=len(rep.get("rounds", [])),
        transferred=int(rep.get("ram", {}).get("transferred", 0)),
        setup_ms=float(rep.get("setup-time", -1)),
        round0_rate=_round0_rate(rep),
        expected_downtime_ms=float(rep.get("expected-downtime", -1)),
        breakdown={k: float(v) for k, v in rep.get("downtime-breakdown", {}).items()},
        verify=_report_verify(rep),
        error="; ".join(x for x in (error, str(rep.get("error-desc", ""))) if x),
    )


def _destination_end(run: VmmRun, dst: Proc, dst_serial: Path) -> None:
    """The destination's guest runs to its RESULT, or (the migration failed) is ended."""
    if run.status != "completed":
        dst.kill()
        last = dst.lines[-1] if dst.lines else "(nothing)"
        run.error += f"; after {run.rounds} rounds, the destination said: {last}"
        return
    code = dst.wait(GUEST_END_TIMEOUT_S)
    run.result = last_result(dst_serial)
    if code != 0:
        run.error = f"destination exit status {code}: {dst.stderr()}"


def run_vmferry(case: Case, plan: MigratePlan, workdir: Path) -> VmmRun:
    w = case.workload
    port = free_port()
    src_serial, dst_serial = workdir / "vmferry-src.serial", workdir / "vmferry-dst.serial"
    qmp_path, report = workdir / "vmferry-src.qmp", workdir / "vmferry-report.json"
    for p in (src_serial, dst_serial, qmp_path, report):
        p.unlink(missing_ok=True)
    argv = [*VMFERRY[:2], "vmferry.bench.migrate", "source", "--memory", str(case.memory)]
    argv += ["--serial", str(src_serial), "--qmp", str(qmp_path), "--report", str(report)]
    argv += ["--fill", "--", *plan.cmdline(case).split()]
    timeout = plan.timeout_s(case.memory)
    with vmferry_destination(port, dst_serial) as dst, Proc(argv) as src:
        wait_for(
            "the vmferry source's QMP socket",
            lambda: qmp_path.exists() or src.proc.poll() is not None,
            START_TIMEOUT_S + case.memory / GIB * 5,  # it fills RAM first
        )
        if src.proc.poll() is not None:
            raise VmferryError(f"the vmferry source exited: {src.stderr()}")
        with QmpClient(str(qmp_path), timeout=q.QMP_TIMEOUT_S) as qmp:
            _configure(qmp, plan)
            wait_for("the guest's first line", lambda: has(src_serial, BANNER), START_TIMEOUT_S)
            time.sleep(w.delay_s)
            if w.stop_first:
                qmp.execute("stop")
            qmp.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
            status, error = _await_end(qmp, timeout)
        src.wait(START_TIMEOUT_S)
        try:
            rep: dict[str, Any] = json.loads(report.read_text())
        except (OSError, ValueError) as e:
            raise VmferryError(f"no migration report from the vmferry source: {e}") from None
        run = _run_of(rep, status, error, timeout)
        _destination_end(run, dst, dst_serial)
    return run


def _round0_rate(rep: dict[str, Any]) -> float:
    rounds = rep.get("rounds", [])
    if not rounds or float(rounds[0].get("duration", 0)) <= 0:
        return -1.0
    return float(rounds[0]["bytes"]) / float(rounds[0]["duration"])


__all__ = ["reference_result", "run_vmferry"]
