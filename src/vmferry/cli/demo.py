"""``vmferry demo``: a running VM live-migrated to another process, and saved/restored.

Everything runs as separate ``vmferry`` processes, as a user would run them.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmferry.cli import traffic as traffic_cmd

RESULT_RE = re.compile(r"^RESULT ([0-9a-f]{16})$", re.MULTILINE)
GUEST = ["memtouch", "--memory", "1G", "--vcpus", "2"]
GUEST_ARGS = ["--", "wss=256M", "pattern=random", "seed=7", "rounds=200"]
VMFERRY = [sys.executable, "-m", "vmferry.cli.main"]
# The vGPU act: gpujob on a vGPU made by UUID, checking every result, migrated mid-job.
GPU_GUEST = ["gpujob", "--memory", "256M"]
GPU_ARGS = ["--", "seed=4", "rounds=3000", "ws=32M", "rate=500"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="live-migrate a running VM, then save and restore one")
    p.add_argument("--migrate-after", type=float, default=1.5, help="seconds (default 1.5)")
    p.add_argument("--report", default="demo-report.json", help="migration report (JSON)")
    p.add_argument("--plot", default="demo-timeline.png", help="migration timeline (PNG)")
    p.set_defaults(func=cmd_demo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _say(console: Console, args: list[str], why: str) -> None:
    console.print(f"[bold]$ vmferry {' '.join(args)}[/]  [dim]# {why}[/]", highlight=False)


def _result(text: str) -> str | None:
    m = RESULT_RE.findall(text)
    return m[-1] if m else None


def _run(console: Console, args: list[str], why: str) -> tuple[str | None, float, str]:
    _say(console, args, why)
    t0 = time.perf_counter()
    p = subprocess.run([*VMFERRY, *args], capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    for line in (p.stdout + p.stderr).splitlines():
        console.print(f"  {line}", highlight=False)
    if p.returncode != 0:
        raise SystemExit(f"vmferry demo: '{why}' failed with status {p.returncode}")
    return _result(p.stdout), dt, p.stderr


def _live_migration(
    console: Console,
    args: argparse.Namespace,
    d: Path,
    guest: tuple[list[str], list[str]] = (GUEST, GUEST_ARGS),
    outputs: tuple[str, str] | None = None,
) -> tuple[str | None, str | None]:
    report, plot = outputs or (args.report, args.plot)
    port = _free_port()
    qmp = str(d / "source.qmp")
    dst_args = ["run", "--incoming", f"tcp:127.0.0.1:{port}"]
    _say(console, dst_args, "the destination waits for the VM")
    dst = subprocess.Popen(
        [*VMFERRY, *dst_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    src_args = ["run", *guest[0], "--qmp", f"unix:{qmp}", *guest[1]]
    _say(console, src_args, "the source boots the guest, with a QMP socket")
    src = subprocess.Popen(
        [*VMFERRY, *src_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(args.migrate_after)
        mig_args = [
            "migrate",
            "--qmp",
            qmp,
            f"tcp:127.0.0.1:{port}",
            "--channels",
            "2",
            "--report",
            report,
            "--plot",
            plot,
        ]
        _say(console, mig_args, f"after {args.migrate_after} s, move it while it runs")
        mig = subprocess.run([*VMFERRY, *mig_args], timeout=300)
        src_out, src_err = src.communicate(timeout=60)
        dst_out, dst_err = dst.communicate(timeout=300)
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
    for who, text in (("source", src_out + src_err), ("destination", dst_out + dst_err)):
        for line in text.splitlines():
            console.print(f"  [dim]{who}:[/] {line}", highlight=False)
    if mig.returncode != 0:
        raise SystemExit("vmferry demo: the migration failed (see above)")
    return _result(src_out), _result(dst_out)


def _vgpu_act(console: Console, args: argparse.Namespace, d: Path) -> bool:
    console.rule("a vGPU: gpujob on a mediated vGPU, VRAM pre-copied, migrated mid-job")
    uuid = _run_text(console, ["mdev", "create", "vgpu-4", "--vram", "1G"], "a 256 MiB vGPU")
    _run_text(console, ["mdev", "list"], "it exists until removed")
    dev = ["--device", f"vgpu,uuid={uuid}"]
    try:
        ref, _, _ = _run(console, ["run", *GPU_GUEST, *dev, *GPU_ARGS], "reference run")
        on_source, migrated = _live_migration(
            console,
            args,
            d,
            ([*GPU_GUEST, *dev], GPU_ARGS),
            (
                str(Path(args.report).with_suffix(".vgpu.json")),
                str(Path(args.plot).with_suffix(".vgpu.png")),
            ),
        )
    finally:
        _run(console, ["mdev", "remove", uuid], "give the VRAM back")
    ok = ref is not None and ref == migrated and on_source is None
    console.print(f"gpujob RESULT: reference {ref}, live-migrated {migrated}", highlight=False)
    return ok


def _run_text(console: Console, args: list[str], why: str) -> str:
    _say(console, args, why)
    p = subprocess.run([*VMFERRY, *args], capture_output=True, text=True, timeout=60)
    console.print(f"  {(p.stdout + p.stderr).strip()}", highlight=False)
    if p.returncode != 0 or not p.stdout.split():
        raise SystemExit(f"vmferry demo: '{why}' failed with status {p.returncode}")
    return p.stdout.split()[0]


def cmd_demo(args: argparse.Namespace) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="vmferry-demo-") as tmp:
        d = Path(tmp)
        console.rule("reference: the guest runs undisturbed")
        ref, ref_s, _ = _run(console, ["run", *GUEST, *GUEST_ARGS], "reference run")
        console.rule("live migration to another process")
        on_source, migrated = _live_migration(console, args, d)
        console.rule("save mid-run, restore in a new process")
        state = str(d / "vm.state")
        _run(
            console,
            ["run", *GUEST, "--save-after", str(args.migrate_after), state, *GUEST_ARGS],
            "stop and save everything",
        )
        restored, _, _ = _run(
            console, ["run", "--incoming", f"file:{state}"], "continue the saved VM"
        )
        vgpu_ok = _vgpu_act(console, args, d)
        vf_ok = traffic_cmd.demo_act(console, d, args.migrate_after)

    table = Table(title="memtouch: 1 GiB, 2 vCPUs, 256 MiB working set, random pattern")
    table.add_column("run")
    table.add_column("RESULT")
    table.add_row(f"reference ({ref_s:.1f} s)", ref or "-")
    table.add_row("live-migrated (printed by the destination)", migrated or "-")
    table.add_row("saved and restored", restored or "-")
    console.print(table)
    console.print(f"report: {args.report}   timeline: {args.plot}")
    ok = ref is not None and ref == migrated == restored and on_source is None
    ok = ok and vgpu_ok and vf_ok
    if not ok:
        console.print(
            "[bold red]a RESULT differs from the reference (or the source finished "
            "the guest itself)[/]"
        )
        return 1
    console.print("[bold green]same RESULT everywhere: memory, vCPU and SSE state moved intact[/]")
    return 0
