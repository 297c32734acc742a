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
from vmferry.bench import nic as bench_nic
from vmferry.bench import tls as bench_tls
from vmferry.bench import vgpu as bench_vgpu
from vmferry.bench.table import print_rows
from vmferry.bench.vmm import FULL, QUICK, Measurement, host_info, run_all


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure vmferry (benchmarks, not tests)")
    which = p.add_subparsers(dest="bench", required=True)
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
    mig = which.add_parser(
        "migrate",
        help="migration throughput against raw TCP, and vmferry against QEMU",
        description="Measure live migration on this host: vmferry's RAM copy against raw "
        "loopback TCP between two processes, then vmferry against QEMU on the same guest "
        "(1 and 4 GiB; --quick: 1 GiB). Needs qemu-system-x86_64, KVM, about 13 GiB of "
        "free memory (5 GiB with --quick); takes about 5 minutes (--quick: about a minute).",
    )
    mig.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    mig.add_argument("--quick", action="store_true", help="1 GiB guests only, one repeat")
    mig.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE as Markdown")
    mig.set_defaults(func=cmd_bench_migrate)
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
    bench_nic.add_parser(which)
    bench_tls.add_parser(which)
    bench_bookkeeping.add_parser(which)


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


def cmd_bench_migrate(args: argparse.Namespace) -> int:
    plan = bench_migrate.QUICK if args.quick else bench_migrate.FULL
    err = Console(stderr=True, soft_wrap=True)
    t0 = time.perf_counter()
    results = bench_migrate.run_all(
        plan,
        lambda msg: err.print(
            f"[dim]vmferry bench: {time.perf_counter() - t0:5.1f} s  {msg}[/dim]", highlight=False
        ),
    )
    elapsed = time.perf_counter() - t0
    tables = (
        (
            "RAM throughput (ratio = vmferry / raw TCP over as many streams, target ≥ 0.9)",
            bench_migrate.THROUGHPUT_COLUMNS,
            bench_migrate.throughput_rows(results.throughput),
        ),
        (
            f"vmferry vs QEMU ({plan.channels} channels, downtime-limit "
            f"{bench_migrate.DOWNTIME_LIMIT_MS} ms, no bandwidth cap; ratio = vmferry / QEMU; "
            f"fastest of {plan.case_repeat})",
            bench_migrate.QEMU_COLUMNS,
            bench_migrate.qemu_rows(results.cases),
        ),
    )
    out = Console(width=220)
    for title, columns, rows in tables:
        table = Table(title=f"vmferry bench migrate: {title}")
        for col in columns:
            table.add_column(
                col,
                overflow="fold",
                justify="left" if col in ("guest", "workload", "notes") else "right",
            )
        for row in rows:
            table.add_row(*row)
        out.print(table)
    err.print(f"[dim]vmferry bench: done in {elapsed:.1f} s[/dim]")
    if args.markdown:
        text = "\n\n".join(
            f"{title}\n\n{bench_migrate.markdown_table(columns, rows)}"
            for title, columns, rows in tables
        )
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        doc = {
            "plan": "quick" if args.quick else "full",
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
