"""``vmferry demo``: show a running VM saved mid-run and continued in another process."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULT_RE = re.compile(r"^RESULT ([0-9a-f]{16})$", re.MULTILINE)
GUEST = ["memtouch", "--memory", "1G", "--vcpus", "2"]
GUEST_ARGS = ["--", "wss=256M", "pattern=random", "seed=7", "rounds=200"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="save a running VM mid-run and restore it elsewhere")
    p.add_argument("--save-after", type=float, default=1.5, help="seconds (default 1.5)")
    p.set_defaults(func=cmd_demo)


def _vmferry(console: Console, title: str, *args: str) -> tuple[str | None, float, str]:
    console.print(f"[bold]$ vmferry {' '.join(args)}[/]  [dim]# {title}[/]")
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    dt = time.perf_counter() - t0
    for line in (p.stdout + p.stderr).splitlines():
        console.print(f"  {line}", highlight=False)
    if p.returncode != 0:
        raise SystemExit(f"vmferry demo: step '{title}' failed with status {p.returncode}")
    m = RESULT_RE.findall(p.stdout)
    return (m[-1] if m else None), dt, p.stderr


def cmd_demo(args: argparse.Namespace) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="vmferry-demo-") as d:
        state = str(Path(d) / "vm.state")
        ref, ref_s, _ = _vmferry(
            console, "reference run, never interrupted", "run", *GUEST, *GUEST_ARGS
        )
        _, save_s, _ = _vmferry(
            console,
            f"stop after {args.save_after} s, save everything",
            "run",
            *GUEST,
            "--save-after",
            str(args.save_after),
            state,
            *GUEST_ARGS,
        )
        size = Path(state).stat().st_size
        restored, rest_s, _ = _vmferry(
            console, "a new process continues the saved VM", "run", "--incoming", f"file:{state}"
        )
    table = Table(title="memtouch: 1 GiB, 2 vCPUs, 256 MiB working set, random pattern")
    for col in ("run", "wall time", "RESULT"):
        table.add_column(col)
    table.add_row("reference", f"{ref_s:.2f} s", ref or "-")
    table.add_row(
        f"saved at {args.save_after} s", f"{save_s:.2f} s", f"({size / 2**20:.0f} MiB state file)"
    )
    table.add_row("restored", f"{rest_s:.2f} s", restored or "-")
    console.print(table)
    if ref is None or ref != restored:
        console.print("[bold red]the restored run's RESULT differs from the reference[/]")
        return 1
    console.print("[bold green]same RESULT: memory, vCPU and SSE state survived save/restore[/]")
    return 0
