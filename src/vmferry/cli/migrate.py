"""``vmferry migrate``: start a migration on a running vmferry over QMP and watch it."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from vmferry.errors import MigrationError
from vmferry.migration.policy import rate, size
from vmferry.qmp.client import QmpClient, QmpProtocolError

POLL_S = 0.2
BAR_WIDTH = 60  # fits an 80-column terminal with room to spare
DONE = ("completed", "failed", "cancelled")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help="live-migrate a running VM (over its QMP socket)",
        description="Start a live migration of the VM behind a QMP socket "
        "and show its progress; print a summary at the end.",
    )
    p.add_argument(
        "uri", help="tcp:HOST:PORT (a `vmferry run --incoming` waiting there) or file:PATH"
    )
    p.add_argument(
        "--qmp", required=True, metavar="SOCKET", help="the VM's QMP socket (unix:PATH or PATH)"
    )
    p.add_argument("--channels", type=int, help="parallel channels (multifd)")
    p.add_argument("--compress", choices=["none", "zstd"], help="compress pages")
    p.add_argument("--downtime-limit", type=int, metavar="MS", help="default 300")
    p.add_argument(
        "--max-bandwidth",
        type=int,
        metavar="BYTES_PER_S",
        help="0 = unlimited (the default; QEMU's default is 128 MiB/s)",
    )
    p.add_argument(
        "--auto-converge",
        action="store_true",
        help="throttle the vCPUs when the guest dirties memory faster than it can be sent",
    )
    p.add_argument(
        "--switchover-timeout",
        type=int,
        metavar="MS",
        help="after this long without converging, apply --switchover-policy",
    )
    p.add_argument("--switchover-policy", choices=["keep-going", "force", "cancel"])
    p.add_argument(
        "--peer-timeout",
        type=int,
        metavar="MS",
        help="a destination silent this long is dead: the VM resumes here (default 5000)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the switchover digests")
    p.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="migrate over TLS with the x509 credentials in DIR (ca-cert.pem, "
        "client-cert.pem, client-key.pem); docs/tls.md",
    )
    p.add_argument(
        "--tls-hostname",
        metavar="NAME",
        help="the name the destination's certificate must hold (default: the URI's host)",
    )
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--plot", metavar="FILE.png", help="draw the timeline here")
    p.set_defaults(func=cmd_migrate)


def _progress(info: dict[str, Any]) -> Group:
    ram = info.get("ram", {})
    sent = ram.get("transferred", 0)
    remaining = ram.get("remaining", 0)
    # Progress of the copy as far as it is known: what went out against that plus what
    # is still dirty (it grows when the guest dirties faster than it is sent).
    bar = ProgressBar(total=max(sent + remaining, 1), completed=sent, width=BAR_WIDTH)
    # A bar ends no line of its own: in a grid row it gets one, so the figures start below.
    head = Table.grid()
    head.add_row(bar)
    t = Table.grid(padding=(0, 2))
    # Never wrapped nor squeezed: in 80 columns a squeezed status showed as one letter.
    for _ in range(4):
        t.add_column(no_wrap=True)
    t.add_row(
        "status", str(info.get("status", "?")), "sync rounds", str(ram.get("dirty-sync-count", 0))
    )
    t.add_row("sent", size(sent), "remaining", size(remaining))
    t.add_row(
        "bandwidth",
        f"{ram.get('mbps', 0) / 8:.0f} MB/s",
        "dirty rate",
        rate(ram.get("dirty-pages-rate", 0) * 4096),
    )
    t.add_row(
        "expected downtime",
        f"{info.get('expected-downtime', 0)} ms",
        "device state",
        size(info.get("vfio", {}).get("transferred", 0)),
    )
    return Group(head, t)


def cmd_migrate(args: argparse.Namespace) -> int:
    path = args.qmp.removeprefix("unix:")
    try:
        return _migrate(args, path)
    except (OSError, QmpProtocolError) as e:
        raise MigrationError(
            f"lost the QMP connection to the source at {path} ({e}): the source process "
            "ended — did the guest finish or fail?"
        ) from e


def _migrate(args: argparse.Namespace, path: str) -> int:
    console = Console(stderr=True)
    with QmpClient(path) as qmp:
        params: dict[str, Any] = {}
        for key, value in (
            ("multifd-channels", args.channels),
            ("multifd-compression", args.compress),
            ("downtime-limit", args.downtime_limit),
            ("max-bandwidth", args.max_bandwidth),
            ("x-switchover-timeout", args.switchover_timeout),
            ("x-switchover-policy", args.switchover_policy),
            ("x-peer-timeout", args.peer_timeout),
            # The source process resolves the path: make it absolute here.
            ("tls-creds", os.path.abspath(args.tls_creds) if args.tls_creds else None),
            ("tls-hostname", args.tls_hostname),
        ):
            if value is not None:
                params[key] = value
        if params:
            qmp.execute("migrate-set-parameters", **params)
        caps = [
            {"capability": "multifd", "state": bool(args.channels and args.channels > 1)},
            {"capability": "auto-converge", "state": args.auto_converge},
            {"capability": "x-verify", "state": not args.no_verify},
        ]
        qmp.execute("migrate-set-capabilities", capabilities=caps)
        qmp.execute("migrate", uri=args.uri)
        info: dict[str, Any] = {"status": "setup"}
        with Live(_progress(info), console=console, refresh_per_second=10) as live:
            while info.get("status") not in DONE:
                time.sleep(POLL_S)
                info = qmp.execute("query-migrate")
                live.update(_progress(info))
        rep: dict[str, Any] = qmp.execute("x-query-migrate-report")
    _summary(console, rep)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(rep, f, indent=2)
    if args.plot:
        from vmferry.migration.plot import plot_report

        plot_report(rep, args.plot)
    if rep["status"] != "completed":
        raise MigrationError(f"migration {rep['status']}: {rep.get('error-desc', '')}")
    return 0


def _verification(v: dict[str, Any]) -> str:
    status = str(v.get("status", "off"))
    if status == "failed":
        bad = v.get("first-mismatches", [])
        where = f" in pages {', '.join(str(p) for p in bad)}" if bad else ""
        cpu = "; vCPU state differs" if v.get("cpu-state") == "failed" else ""
        return f"failed{where}{cpu} ({v.get('pages-checked', 0)} pages checked)"
    if status == "passed":
        return f"passed ({v.get('pages-checked', 0)} pages checked)"
    if status == "deferred":
        return f"deferred: {v.get('detail', 'checked when the file is restored')}"
    return status


def _summary(console: Console, rep: dict[str, Any]) -> None:
    t = Table(title=f"migration {rep['status']}")
    t.add_column("")
    t.add_column("")
    ram = rep.get("ram", {})
    rows = [
        ("total time", f"{rep.get('total-time', 0)} ms"),
        ("downtime", f"{rep.get('downtime', '-')} ms"),
        ("rounds", str(len(rep.get("rounds", [])))),
        ("RAM sent", size(ram.get("transferred", 0))),
        ("verification", _verification(rep.get("verify", {}))),
        ("convergence", rep.get("convergence", "")),
    ]
    for k, v in rep.get("downtime-breakdown", {}).items():
        rows.append((f"  downtime: {k}", f"{v:.1f} ms"))
    if rep.get("error-desc"):
        rows.append(("error", rep["error-desc"]))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
