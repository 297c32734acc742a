"""``vmferry bench vmm``: measure the VMM against same-run baselines; print a table, or JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmferry.bench import bookkeeping as bench_bookkeeping
from vmferry.bench import devices as bench_devices
from vmferry.bench import migrate as bench_migrate
from vmferry.bench import migrate_results as mr
from vmferry.bench import nic as bench_nic
from vmferry.bench import postcopy as bench_postcopy
from vmferry.bench import tls as bench_tls
from vmferry.bench import vgpu as bench_vgpu
from vmferry.bench.table import print_rows
from vmferry.bench.vmm import FULL, QUICK, Measurement, host_info, run_all


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure vmferry (benchmarks, not tests)")
    which = p.add_subparsers(dest="bench", required=True)
    _add_vmm(which)
    _add_migrate(which)
    _add_devices(which)
    _add_vgpu(which)
    bench_nic.add_parser(which)
    bench_tls.add_parser(which)
    bench_bookkeeping.add_parser(which)
    bench_postcopy.add_parser(which)


def _add_vmm(which: Any) -> None:
    vmm = which.add_parser(
        "vmm",
        help="guest dirtying rate, save/restore of a full guest, dirty-bitmap scans",
        description="Measure the VMM, each number next to a baseline taken in the same run. "
        "The full run takes a few minutes and needs about 10 GiB of free disk in --dir and "
        "4 GiB in /dev/shm; --quick is a small smoke run.",
    )
    vmm.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    vmm.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    vmm.add_argument(
        "--dir",
        default="/var/tmp",
        type=Path,
        help="where the save files go (a disk-backed filesystem; default /var/tmp)",
    )
    vmm.set_defaults(func=cmd_bench_vmm)


def _add_migrate(which: Any) -> None:
    mig = which.add_parser(
        "migrate",
        help="migration throughput against raw TCP, and vmferry against QEMU",
        description="Measure live migration on this host: vmferry's round 0 against raw "
        "loopback TCP between two processes, then vmferry (verification on) against QEMU "
        "on the same filled guest: 1, 4 and 8 GiB; idle, a 256 MiB working set rewritten "
        "unpaced, a 1 GiB working set at 512 MB/s; each VMM twice per case in ABBA order "
        "(medians and ranges). Needs qemu-system-x86_64, KVM and 2 × the largest guest + "
        "2 GiB of free memory (a case that does not fit is skipped and says so); the full "
        "run takes about 25 minutes, --quick about 3.",
    )
    mig.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    mig.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE as Markdown")
    mig.add_argument("--quick", action="store_true", help="1 GiB guests only, one repeat")
    mig.add_argument(
        "--sizes", metavar="GIB,…", help="guest sizes in GiB (default 1,4,8; --quick: 1)"
    )
    mig.add_argument(
        "--workloads",
        metavar="NAME,…",
        help=f"of {','.join(bench_migrate.WORKLOADS)} (default: all)",
    )
    mig.add_argument(
        "--repeats", type=int, metavar="N", help="runs per VMM per case (default 2; --quick: 1)"
    )
    mig.add_argument(
        "--skip-throughput", action="store_true", help="leave out part 1 (round 0 vs raw TCP)"
    )
    mig.set_defaults(func=cmd_bench_migrate)


def _add_devices(which: Any) -> None:
    dev = which.add_parser(
        "devices",
        help="what each DMA dirty-tracking mode costs a migration (dmatest + dmaengine)",
        description="Migrate dmatest with a busy dmaengine in each tracking mode (iommu, "
        "device, none), interleaved, and report total time, downtime and bytes as ratios to "
        "iommu mode measured in the same run.",
    )
    dev.add_argument("--repeats", type=int, default=5, help="migrations per mode (median)")
    dev.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    dev.set_defaults(func=cmd_bench_devices)


def _add_vgpu(which: Any) -> None:
    vg = which.add_parser(
        "vgpu",
        help="vGPU downtime with VRAM pre-copy vs stop-copy only; the scanner's cost",
        description="Migrate gpujob on a busy vGPU with VRAM shares of 256 MiB, 1 GiB and "
        "2 GiB, with VRAM pre-copy and with stop-copy only, interleaved; report downtimes, "
        "their ratio (target <= 0.2), 1 GiB against gMig's 119 ms, and the command "
        "scanner's cost per command. Needs KVM and about 6 GiB of free memory; takes a "
        "minute or two.",
    )
    vg.add_argument("--repeats", type=int, default=1, help="migrations per case (median)")
    vg.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    vg.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown")
    vg.set_defaults(func=cmd_bench_vgpu)


def _fmt(value: float, unit: str) -> str:
    if unit == "MB/s":
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:.3f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}"


def render(results: list[Measurement], console: Console) -> None:
    table = Table(title="vmferry bench vmm (ratio = value / baseline)")
    for col in ("section", "measurement", "value", "baseline", "baseline value", "ratio", "note"):
        table.add_column(
            col,
            justify="right" if col in ("value", "baseline value", "ratio") else "left",
            overflow="fold",
        )
    for r in results:
        table.add_row(
            r.section,
            r.what,
            _fmt(r.value, r.unit),
            r.baseline,
            _fmt(r.baseline_value, r.unit),
            f"{r.ratio:.3g}",
            r.note,
        )
    console.print(table)


def cmd_bench_vmm(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    err = Console(stderr=True)
    t0 = time.perf_counter()
    results = run_all(plan, args.dir, lambda msg: err.print(f"[dim]vmferry bench: {msg}[/dim]"))
    elapsed = time.perf_counter() - t0
    render(results, Console(width=200))
    err.print(f"[dim]vmferry bench: done in {elapsed:.1f} s[/dim]")
    if args.json:
        doc = {
            "plan": "quick" if args.quick else "full",
            "host": host_info(),
            "elapsed_s": elapsed,
            "measurements": [r.to_dict() for r in results],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def migrate_plan(args: argparse.Namespace) -> bench_migrate.MigratePlan:
    """The plan the options ask for (bad values: ConfigError, one line, exit 125)."""
    return bench_migrate.make_plan(
        quick=args.quick,
        sizes=bench_migrate.parse_sizes(args.sizes) if args.sizes else None,
        workloads=bench_migrate.parse_workloads(args.workloads) if args.workloads else None,
        repeats=args.repeats,
        throughput=not args.skip_throughput,
    )


Tables = list[tuple[str, tuple[str, ...], list[list[str]]]]


def migrate_tables(
    results: bench_migrate.MigrateResults, plan: bench_migrate.MigratePlan
) -> Tables:
    """Every table of the run, titled: what the terminal and the Markdown show."""
    out: Tables = []
    if results.throughput:
        out.append(
            (
                "Round 0 of a paused, filled guest against raw loopback TCP into populated "
                f"memory over as many streams (median (range) of {plan.ram_repeat}; "
                "target ≥ 0.9)",
                mr.THROUGHPUT_COLUMNS,
                mr.throughput_rows(results.throughput),
            )
        )
    out.append(
        (
            f"vmferry (verification on) vs QEMU: {plan.channels} channels, downtime-limit "
            f"{plan.downtime_limit_ms} ms, no bandwidth cap; median (range) of "
            f"{plan.repeats} per VMM, ABBA; ratio = vmferry median / QEMU median",
            mr.CASE_COLUMNS,
            mr.case_rows(results.cases),
        )
    )
    ind = mr.independence(results.cases)
    if ind:
        out.append(
            (
                "Downtime independent of RAM size: vmferry's median downtime at the largest "
                "guest ÷ at the smallest, same workload (target ≤ 1.2)",
                mr.INDEPENDENCE_COLUMNS,
                mr.independence_rows(ind),
            )
        )
    parts = mr.breakdown_rows(results.cases)
    if parts:
        out.append(
            (
                "Where vmferry's downtime went (medians, ms)",
                mr.BREAKDOWN_COLUMNS,
                parts,
            )
        )
    return out


def migrate_markdown(tables: Tables, notes: list[str]) -> str:
    text = "\n\n".join(
        f"{title}\n\n{mr.markdown_table(cols, rows)}" for title, cols, rows in tables
    )
    if notes:
        text += "\n\nRuns that failed:\n\n" + "\n".join(f"- {n}" for n in notes)
    return text + "\n"


def cmd_bench_migrate(args: argparse.Namespace) -> int:
    plan = migrate_plan(args)
    err = Console(stderr=True, soft_wrap=True)
    t0 = time.perf_counter()
    results = bench_migrate.run_all(
        plan,
        lambda msg: err.print(
            f"[dim]vmferry bench: {time.perf_counter() - t0:6.1f} s  {msg}[/dim]", highlight=False
        ),
    )
    elapsed = time.perf_counter() - t0
    tables = migrate_tables(results, plan)
    notes = mr.errors(results.cases)
    out = Console(width=240)
    for title, columns, rows in tables:
        table = Table(title=f"vmferry bench migrate: {title}")
        for col in columns:
            table.add_column(
                col,
                overflow="fold",
                justify="left" if col in ("guest", "workload", "case") else "right",
            )
        for row in rows:
            table.add_row(*row)
        out.print(table)
    for n in notes:
        out.print(f"failed: {n}", highlight=False)
    err.print(f"[dim]vmferry bench: done in {elapsed:.1f} s[/dim]")
    if args.markdown:
        Path(args.markdown).write_text(migrate_markdown(tables, notes))
    if args.json:
        doc = {
            "plan": {
                "quick": args.quick,
                "sizes_gib": list(plan.sizes),
                "workloads": list(plan.workloads),
                "repeats": plan.repeats,
                "channels": plan.channels,
                "downtime_limit_ms": plan.downtime_limit_ms,
            },
            "host": bench_migrate.host_info(),
            "elapsed_s": elapsed,
            **results.to_dict(),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


DEVICE_COLUMNS = (
    "mode",
    "total-time-ms",
    "total-time-ratio",
    "downtime-ms",
    "downtime-ratio",
    "ram-bytes",
    "ram-bytes-ratio",
    "device-bytes",
    "dma-dirty-pages",
    "rounds",
)


def cmd_bench_devices(args: argparse.Namespace) -> int:
    rows = bench_devices.run(args.repeats)
    print_rows(
        f"vmferry bench devices: dmatest, median of {args.repeats} "
        "(ratio = mode / iommu, same run)",
        DEVICE_COLUMNS,
        rows,
        args.json,
    )
    return 0


def cmd_bench_vgpu(args: argparse.Namespace) -> int:
    result = bench_vgpu.run(args.repeats)
    out = Console()
    table = Table(title=f"vmferry bench vgpu: gpujob busy, median of {args.repeats}")
    cols = (
        "vram-share-mib",
        "precopy-downtime-ms",
        "stopcopy-downtime-ms",
        "downtime-ratio",
        "precopy-device-state-ms",
        "stopcopy-device-state-ms",
        "precopy-total-ms",
        "stopcopy-total-ms",
        "precopy-device-stop-copy-bytes",
        "stopcopy-device-stop-copy-bytes",
    )
    for c in cols:
        table.add_column(c, justify="right")
    for r in result["rows"]:
        table.add_row(*(f"{r[c]:,.3f}" if isinstance(r[c], float) else f"{r[c]:,}" for c in cols))
    out.print(table)
    for name, us in result["scanner-us-per-command"].items():
        out.print(f"scanner: {name}: {us:.1f} µs per command")
    for line in bench_vgpu.verdicts(result):
        out.print(line)
    if args.markdown:
        Path(args.markdown).write_text(bench_vgpu.markdown(result) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
