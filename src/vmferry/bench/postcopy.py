"""``vmferry bench postcopy``: a guest that dirties memory faster than the link carries
it, migrated by pre-copy with auto-converge and by pre-copy then post-copy, on vmferry
and on QEMU 7.2, in one run (issue 11, item 6).

The guest, the link and why: ``postcopy_plan``. Each case runs ``repeats`` times in
ABBA order; per run: total time, downtime, round 0's rate, the guest's own speed
before / during / after the migration and its longest stall (``postcopy_progress``),
post-copy's page requests, their latency and the vCPUs' blocktime. The issue's
targets are ratios of the cases' medians (``postcopy_results``). A case that cannot
run (no QEMU, not enough memory, a VMM refusing post-copy) is reported as skipped
with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmferry.bench import fill as bench_fill
from vmferry.bench import qemu as q
from vmferry.bench.migrate import host_info, host_load
from vmferry.bench.postcopy_drive import Refused
from vmferry.bench.postcopy_plan import CASE_BY_KEY, GIB, IMAGE, MB, PostcopyPlan, make_plan, order
from vmferry.bench.postcopy_qemu import run_qemu
from vmferry.bench.postcopy_results import (
    CASE_COLUMNS,
    TARGET_COLUMNS,
    CaseResult,
    Run,
    case_rows,
    failures,
    markdown,
    target_rows,
    targets,
)
from vmferry.bench.postcopy_vmferry import run_vmferry
from vmferry.bench.selection import parse_selection
from vmferry.errors import VmferryError
from vmferry.machine.images import resolve_image
from vmferry.qmp.client import QmpProtocolError

Progress = Callable[[str], None]
Tables = list[tuple[str, tuple[str, ...], list[list[str]]]]


def parse_cases(text: str) -> tuple[str, ...]:
    """``qemu-postcopy,vmferry-postcopy`` → those keys, in the plan's order."""
    return parse_selection("--cases", text, CASE_BY_KEY)


def why_skipped(key: str, plan: PostcopyPlan) -> str:
    """Why a case cannot run on this host at all ("" if it can)."""
    try:
        resolve_image(IMAGE)
        if CASE_BY_KEY[key].vmm == "qemu":
            q.qemu_binary()
    except VmferryError as e:
        return str(e)
    available = bench_fill.available_memory()
    if not bench_fill.fits(plan.memory, available):
        return (
            f"needs 2 × {plan.memory / GIB:g} GiB + {bench_fill.MARGIN // GIB} GiB free, "
            f"{available / GIB:.1f} GiB available"
        )
    return ""


def _one_run(key: str, repeat: int, plan: PostcopyPlan, workdir: Path) -> Run:
    case = CASE_BY_KEY[key]
    try:
        if case.vmm == "qemu":
            return run_qemu(case, repeat, plan, workdir)
        return run_vmferry(case, repeat, plan, workdir)
    except Refused:
        raise
    except (VmferryError, OSError, QmpProtocolError) as e:
        return Run(key, repeat, "error", memory=plan.memory, error=str(e) or type(e).__name__)


def _said(r: Run) -> str:
    rates = r.rates
    guest = ""
    if rates is not None:
        guest = (
            f", guest {rates.before / MB:,.0f} → {rates.during / MB:,.0f} → "
            f"{rates.after / MB:,.0f} MB/s, {rates.bad_pages} bad pages"
        )
    why = "" if r.good else f" — {r.error or 'bad'}"
    return (
        f"{r.status}, total {r.total_ms / 1e3:,.1f} s, downtime {r.downtime_ms:,.0f} ms{guest}{why}"
    )


def run_all(plan: PostcopyPlan, progress: Progress) -> dict[str, CaseResult]:
    cases = {k: CaseResult(k) for k in plan.cases}
    for key, c in cases.items():
        c.skipped = why_skipped(key, plan)
        if c.skipped:
            progress(f"{key}: skipped: {c.skipped}")
    runs = order(plan.cases, plan.repeats)
    with _workdir() as d:
        for i, (key, repeat) in enumerate(runs):
            c = cases[key]
            if c.skipped:
                continue
            progress(f"{key}: run {repeat + 1} of {plan.repeats} ({i + 1}/{len(runs)} in all)")
            try:
                r = _one_run(key, repeat, plan, d)
            except Refused as e:
                c.skipped = str(e)
                progress(f"{key}: skipped: {c.skipped}")
                continue
            c.runs.append(r)
            progress(f"{key}: {_said(r)}")
    return cases


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmferry-bench-postcopy-") as d:
        yield Path(d)


def tables(plan: PostcopyPlan, cases: dict[str, CaseResult]) -> Tables:
    every = [
        cases[k] if k in cases else CaseResult(k, skipped="not asked for") for k in CASE_BY_KEY
    ]
    link = (
        f"{plan.memory / GIB:g} GiB guest, {plan.wss / GIB:g} GiB working set, cap "
        f"{plan.cap / MB:,.0f} MB/s, downtime-limit {plan.downtime_limit_ms} ms, "
        f"{plan.channels} channels"
    )
    return [
        (
            f"Targets (issue 11), from the medians; misses first ({link})",
            TARGET_COLUMNS,
            target_rows(targets({c.key: c for c in every})),
        ),
        (
            f"Each case: median (range) of the good runs of {plan.repeats}, ABBA ({link})",
            CASE_COLUMNS,
            case_rows(every),
        ),
    ]


def add_parser(which: Any) -> None:
    p = which.add_parser(
        "postcopy",
        help="post-copy vs pre-copy with auto-converge, vmferry and QEMU, on a guest that "
        "dirties memory faster than the link",
        description="Migrate churn (a 1 GiB working set rewritten as fast as it can, in a "
        "2 GiB guest filled first) over loopback capped at 150 MB/s: vmferry pre-copy with "
        "auto-converge, vmferry pre-copy then post-copy, QEMU 7.2 pre-copy with "
        "auto-converge, QEMU 7.2 postcopy-ram; each twice in ABBA order. Reports total "
        "time, downtime, the guest's own speed before/during/after, page-request latency "
        "and blocktime, and the issue's targets (misses first). Needs KVM, "
        "qemu-system-x86_64 and about 6 GiB free; the full run takes about 14 minutes on "
        "a busy 2-core host, --quick (1 GiB guest, 512 MiB working set, one repeat) about 4.",
    )
    p.add_argument("--quick", action="store_true", help="1 GiB guest, one repeat")
    p.add_argument("--repeats", type=int, metavar="N", help="runs per case (default 2; --quick 1)")
    p.add_argument("--cases", metavar="NAME,…", help=f"of {','.join(CASE_BY_KEY)} (default all)")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE as Markdown")
    p.set_defaults(func=cmd_bench_postcopy)


def _print(tabs: Tables, notes: list[str]) -> None:
    out = Console(width=260)
    for title, columns, rows in tabs:
        table = Table(title=f"vmferry bench postcopy: {title}")
        for col in columns:
            left = col in ("case", "target", "verdict", "from")
            table.add_column(col, overflow="fold", justify="left" if left else "right")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    for n in notes:
        out.print(f"did not count: {n}", highlight=False)


def cmd_bench_postcopy(args: argparse.Namespace) -> int:
    plan = make_plan(quick=args.quick, repeats=args.repeats)
    if args.cases:
        plan = PostcopyPlan(**{**plan.__dict__, "cases": parse_cases(args.cases)})
    err = Console(stderr=True, soft_wrap=True)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        err.print(
            f"[dim]vmferry bench: {time.perf_counter() - t0:6.1f} s  {msg}[/dim]", highlight=False
        )

    load = {"start": host_load()}
    progress(f"host load at the start: {load['start']}")
    cases = run_all(plan, progress)
    load["end"] = host_load()
    progress(f"host load at the end: {load['end']}")
    elapsed = time.perf_counter() - t0
    tabs = tables(plan, cases)
    notes = failures(list(cases.values()))
    _print(tabs, notes)
    err.print(f"[dim]vmferry bench: done in {elapsed:.1f} s[/dim]")
    if args.markdown:
        Path(args.markdown).write_text(markdown(tabs, notes))
    if args.json:
        doc = {
            "plan": {**plan.__dict__, "cmdline": plan.cmdline},
            "host": host_info(),
            "load": load,
            "elapsed_s": elapsed,
            "cases": [c.to_dict() for c in cases.values()],
            "targets": [dict(zip(TARGET_COLUMNS, row, strict=True)) for row in tabs[0][2]],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


__all__ = ["add_parser", "cmd_bench_postcopy", "parse_cases", "run_all", "tables", "why_skipped"]
