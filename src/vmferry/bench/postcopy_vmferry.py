"""vmferry's runs of ``vmferry bench postcopy``: a source process (``python -m
vmferry.bench.postcopy_vmferry source``: churn booted with RAM filled from the host, a
QMP socket, the report written when told to quit) and a ``vmferry run --incoming
defer --qmp`` destination, both configured over QMP as QEMU's are.

Pre-copy: auto-converge (the same defaults as QEMU's). Post-copy: postcopy-ram and
postcopy-blocktime on both sides, migrate-start-postcopy as soon as the migration is
active: vmferry switches at the end of the round in flight, round 0. Both: max-bandwidth
the cap, the downtime limit, multifd-channels, verification on.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vmferry.bench import source_proc
from vmferry.bench.migrate_procs import Proc, free_port
from vmferry.bench.postcopy_drive import Refused, Timeline, migrate, warm_up
from vmferry.bench.postcopy_plan import GIB, IMAGE, START_TIMEOUT_S, VMFERRY, Case, PostcopyPlan
from vmferry.bench.postcopy_progress import SerialTail, phase_rates
from vmferry.bench.postcopy_results import Run
from vmferry.controller import VmController
from vmferry.errors import VmferryError
from vmferry.machine import Machine, MachineConfig
from vmferry.qmp.backend import QmpError
from vmferry.qmp.client import QmpClient, QmpProtocolError

QMP_TIMEOUT_S = 30.0
LINGER_S = 120.0  # the source waits this long for `quit` after its migration completed
NAN = math.nan


def _set(qmp: QmpClient, side: str, caps: dict[str, bool], params: dict[str, Any]) -> None:
    try:
        if params:
            qmp.execute("migrate-set-parameters", **params)
        qmp.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": k, "state": v} for k, v in caps.items()],
        )
    except QmpError as e:
        raise Refused(f"vmferry's {side} refused {sorted(caps)} / {sorted(params)}: {e}") from None


def configure(src: QmpClient, dst: QmpClient, case: Case, plan: PostcopyPlan) -> None:
    multifd = plan.channels > 1
    params = {
        "multifd-channels": plan.channels,
        "downtime-limit": plan.downtime_limit_ms,
        "max-bandwidth": plan.cap,
        "x-verify": "on",
    }
    caps = {"multifd": multifd, "x-verify": True}
    if case.postcopy:
        caps |= {"postcopy-ram": True, "postcopy-blocktime": True}
        _set(dst, "destination", caps, {})
    else:
        caps["auto-converge"] = True
    _set(src, "source", caps, params)


def _num(doc: dict[str, Any], *keys: str) -> float:
    """The first of ``keys`` (a.b for nested) that ``doc`` has, as a float; NaN if none."""
    for key in keys:
        cur: Any = doc
        for part in key.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, int | float) and not isinstance(cur, bool):
            return float(cur)
    return NAN


def postcopy_figures(src: dict[str, Any], dst: dict[str, Any]) -> dict[str, Any]:
    """Post-copy's figures from the source's report (its PostcopyFigures, as the source
    process writes them under "x-bench-postcopy", or the report's own rendering) and the
    destination's query-migrate, which measures the waits: the destination's figure
    wherever it has one."""
    mine = src.get("x-bench-postcopy") or {}
    lat: dict[str, float] = {}
    for doc in (dst, dst.get("postcopy", {}), mine, src.get("postcopy", {})):
        got = doc.get("latency_ms") or doc.get("latency") or doc.get("postcopy-latency-ms")
        if isinstance(got, dict) and got:
            lat = {k: float(v) for k, v in got.items() if isinstance(v, int | float)}
            break
    active = bool(mine.get("active"))  # PostcopyFigures' zeros mean nothing without it
    blocktime = _num(dst, "postcopy-blocktime", "postcopy.blocktime_ms", "postcopy.blocktime-ms")
    if math.isnan(blocktime) and active:
        blocktime = _num(mine, "blocktime_ms")
    return {
        "requests": _num(src, "ram.postcopy-requests", "x-bench-postcopy.requests"),
        "bytes": _num(src, "ram.postcopy-bytes", "x-bench-postcopy.bytes"),
        "switch_ms": _num(mine, "switch_s") * 1e3 if active else NAN,
        "blocktime_ms": blocktime,
        "latency_ms": lat,
    }


def _round0_rate(rep: dict[str, Any]) -> float:
    rounds = rep.get("rounds", [])
    if not rounds or float(rounds[0].get("duration", 0)) <= 0:
        return NAN
    return float(rounds[0]["bytes"]) / float(rounds[0]["duration"])


def run_of(
    case: Case,
    repeat: int,
    plan: PostcopyPlan,
    tl: Timeline,
    rep: dict[str, Any],
    dst: dict[str, Any],
) -> Run:
    """The run as the source's report and the destination's query-migrate tell it."""
    status = str(rep.get("status", tl.status))
    pc = postcopy_figures(rep, dst)
    verify = rep.get("verify", {})
    return Run(
        case.key,
        repeat,
        status,
        memory=plan.memory,
        total_ms=_num(rep, "total-time"),
        downtime_ms=_num(rep, "downtime") if status == "completed" else NAN,
        round0_rate=_round0_rate(rep),
        rounds=len(rep.get("rounds", [])),
        transferred=int(_num(rep, "ram.transferred") if "ram" in rep else 0),
        throttle_pct=max(tl.max_throttle, int(rep.get("cpu-throttle-percentage", 0) or 0)),
        switch_ms=pc["switch_ms"] if math.isfinite(pc["switch_ms"]) else tl.switch_ms,
        requests=int(pc["requests"]) if math.isfinite(pc["requests"]) else 0,
        postcopy_bytes=int(pc["bytes"]) if math.isfinite(pc["bytes"]) else 0,
        blocktime_ms=pc["blocktime_ms"],
        latency_ms=pc["latency_ms"],
        verify=str(verify.get("status", "")) if isinstance(verify, dict) else "",
        error="; ".join(x for x in (tl.error, str(rep.get("error-desc", ""))) if x),
    )


def _qmp(path: Path, proc: Proc, what: str, timeout: float) -> QmpClient:
    """Connect once the process listens (the socket file appears just before it does)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.proc.poll() is not None:
            raise VmferryError(f"{what} exited at start: {proc.stderr()}")
        with contextlib.suppress(ConnectionRefusedError, FileNotFoundError):
            return QmpClient(str(path), timeout=QMP_TIMEOUT_S)
        if time.monotonic() > deadline:
            raise VmferryError(f"{what}'s QMP socket did not open within {timeout:.0f} s")
        time.sleep(0.05)


def run_vmferry(case: Case, repeat: int, plan: PostcopyPlan, workdir: Path) -> Run:
    port = free_port()
    src_serial, dst_serial = workdir / "vmferry-src.serial", workdir / "vmferry-dst.serial"
    src_qmp, dst_qmp = workdir / "vmferry-src.qmp", workdir / "vmferry-dst.qmp"
    report = workdir / "vmferry-report.json"
    for p in (src_serial, dst_serial, src_qmp, dst_qmp, report):
        p.unlink(missing_ok=True)
    src_argv = [*VMFERRY[:2], "vmferry.bench.postcopy_vmferry", "source"]
    src_argv += ["--memory", str(plan.memory), "--serial", str(src_serial), "--qmp", str(src_qmp)]
    src_argv += ["--report", str(report), "--", *plan.cmdline.split()]
    dst_argv = [*VMFERRY, "run", "--incoming", "defer", "--qmp", str(dst_qmp)]
    dst_argv += ["--serial", str(dst_serial)]
    with Proc(dst_argv) as dst, Proc(src_argv) as src:
        dq = _qmp(dst_qmp, dst, "the vmferry destination", START_TIMEOUT_S)
        sq = _qmp(src_qmp, src, "the vmferry source", START_TIMEOUT_S + plan.memory / GIB * 5)
        with dq, sq:
            configure(sq, dq, case, plan)
            dq.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            with SerialTail([src_serial, dst_serial]) as tail:
                warm_up(tail, plan, lambda: src.proc.poll() is None)
                tl = migrate(
                    sq,
                    f"tcp:127.0.0.1:{port}",
                    tail,
                    plan,
                    case,
                    lambda info: info.get("status") == "active",
                )
                samples = tail.samples()
            dst_info: dict[str, Any] = {}
            # A destination that went away: its figures are not known.
            with contextlib.suppress(QmpError, QmpProtocolError, OSError):
                dst_info = dq.execute("query-migrate")
            with contextlib.suppress(QmpProtocolError, OSError):
                sq.execute("quit")  # the source writes its report, then exits
        src.wait(START_TIMEOUT_S)
        try:
            rep: dict[str, Any] = json.loads(report.read_text())
        except (OSError, ValueError) as e:
            raise VmferryError(f"no migration report from the vmferry source: {e}") from None
    run = run_of(case, repeat, plan, tl, rep, dst_info)
    run.rates = phase_rates(samples, tl.before, tl.start, tl.end, tl.after, tl.postcopy_seen)
    return run


# ---- the source process ---------------------------------------------------------------------


class _Lingering(VmController):
    """A controller that notices `quit` even after a completed migration has already
    ended it (the outcome stays "migrated")."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self.quit_asked = threading.Event()

    def quit(self) -> None:
        self.quit_asked.set()
        super().quit()


def _source_main(argv: list[str]) -> int:
    """churn with RAM filled from the host and a QMP socket; after its migration it waits
    for `quit` and writes the report (x-query-migrate-report's, plus its PostcopyFigures
    as "x-bench-postcopy") before it exits."""
    argv, guest = source_proc.split_guest(argv)
    p = source_proc.source_parser("python -m vmferry.bench.postcopy_vmferry source", 600.0)
    args = p.parse_args(argv)
    config = MachineConfig(memory=args.memory, image=IMAGE, cmdline=" ".join(guest))

    def until(controller: _Lingering, timeout_s: float) -> str:
        outcome = ""
        deadline = time.monotonic() + timeout_s
        while not controller.quit_asked.is_set() and time.monotonic() < deadline:
            outcome = controller.wait_for(0.05)
            if outcome == "migrated":  # wait_for no longer waits: the VM has left
                deadline = min(deadline, time.monotonic() + LINGER_S)
                controller.quit_asked.wait(0.05)
            elif outcome:
                break  # the guest ended, or quit before any migration ended
        return outcome

    outcome = source_proc.serve(
        args,
        config,
        _Lingering,
        until,
        fill=True,
        report_extra=lambda mig: {"x-bench-postcopy": asdict(mig.stats.postcopy)},
    )
    print(f"vmferry bench postcopy source: {outcome or 'timed out'}", file=sys.stderr)
    return 0


__all__ = ["configure", "postcopy_figures", "run_of", "run_vmferry"]


if __name__ == "__main__":
    if sys.argv[1:2] != ["source"]:
        sys.exit("usage: python -m vmferry.bench.postcopy_vmferry source …")
    sys.exit(_source_main(sys.argv[2:]))
