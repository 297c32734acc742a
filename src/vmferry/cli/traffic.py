"""``vmferry traffic``: send numbered frames to a VM's VF and check every echo (netecho)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from vmferry.devices.nic.host import HostConfig, parse_addr
from vmferry.devices.nic.regs import parse_mac
from vmferry.errors import ConfigError
from vmferry.traffic import TrafficPeer


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "traffic",
        help="traffic peer: frames to a VM's VF via its host switch, every echo checked",
        description="Send numbered frames at a steady rate to a VM's MAC through the UDP "
        "uplink of the host switch it lives behind, follow the VM when it migrates (the "
        "destination announces its MAC), check every echo, and report sent, echoed, lost, "
        "duplicated, reordered, corrupted and the longest gap between echoes.",
    )
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the host switch's uplink")
    p.add_argument("--mac", required=True, help="the VF's MAC address")
    p.add_argument("--rate", type=float, default=1000.0, help="frames per second (default 1000)")
    p.add_argument("--size", type=int, default=128, help="frame size in bytes (default 128)")
    p.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="seconds of traffic (default 5); SIGINT or SIGTERM ends it early, with the report",
    )
    p.add_argument("--bind", default="0.0.0.0:0", metavar="HOST:PORT", help="the peer's address")
    p.add_argument("--vlan", type=int, default=0, help="tag frames with this VLAN")
    p.add_argument("--no-stop", action="store_true", help="leave netecho running at the end")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=cmd_traffic)


def cmd_traffic(args: argparse.Namespace) -> int:
    try:
        mac = parse_mac(args.mac)
        peer = TrafficPeer(
            parse_addr(args.to),
            mac,
            rate=args.rate,
            size=args.size,
            bind=parse_addr(args.bind),
            vlan=args.vlan,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    done = threading.Event()
    # Ended early as ping is: the report still comes (a test stops it once the VM moved).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    peer.start()
    # One line at once: whoever runs the peer knows the traffic flows from now.
    print(f"traffic: sending {args.rate:g} frames/s to {args.mac} via {args.to}", flush=True)
    end = time.monotonic() + args.duration
    # In slices: a signal the kernel gave another thread runs its handler only once the
    # main thread is back in Python.
    while not done.wait(min(0.1, max(0.0, end - time.monotonic()))) and time.monotonic() < end:
        pass
    report = peer.stop(stop_guest=not args.no_stop)
    print(f"traffic: {report.summary()}")
    for t, where in report.moves:
        print(f"traffic: at {t:.3f} s the VM's MAC moved to {where}")
    if report.guest is not None:
        g = report.guest
        print(
            f"traffic: netecho received {g['received']}, echoed {g['echoed']}, "
            f"RESULT {g['result']:016x} (expected {report.expected_result})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    ok = report.corrupted == 0 and report.duplicated == 0 and report.echoed > 0
    return 0 if ok else 1


def demo_act(console: Any, d: Path, migrate_after: float = 1.5) -> bool:
    """`vmferry demo`'s VF act: netecho on a VF under traffic, live-migrated between two
    hosts (state directories) on loopback; prints the traffic report next to the
    migration's. True if the connection survived (nothing lost, corrupted, duplicated)."""
    console.rule("an SR-IOV VF: netecho answers a traffic peer while it is migrated")
    cli = [sys.executable, "-m", "vmferry.cli.main"]
    ports = []
    for _ in range(3):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hosts = [d / "host-a", d / "host-b"]
    for i, h in enumerate(hosts):
        HostConfig(h).set_numvfs(
            "pf0", 1, uplink=f"127.0.0.1:{ports[i]}", neighbours=[f"127.0.0.1:{ports[1 - i]}"]
        )
    mac = HostConfig(hosts[0]).read().vf("pf0", 0).mac

    def start(host: Path | None, args: list[str]) -> subprocess.Popen[str]:
        env = dict(os.environ, **({"VMFERRY_STATE_DIR": str(host)} if host else {}))
        console.print(f"[bold]$ vmferry {' '.join(args)}[/]", highlight=False)
        return subprocess.Popen(
            [*cli, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    qmp, rep, mig_rep = d / "vf.qmp", d / "traffic.json", d / "vf-migration.json"
    dst = start(hosts[1], ["run", "--incoming", f"tcp:127.0.0.1:{ports[2]}"])
    src = start(
        hosts[0],
        ["run", "netecho", "--memory", "64M", "--device", "vf,pf=pf0,index=0",
         "--qmp", f"unix:{qmp}", "--", "idle=30"],
    )  # fmt: skip
    procs = [dst, src]
    try:
        while not qmp.exists() and src.poll() is None:
            time.sleep(0.05)
        peer = start(
            None,
            ["traffic", "--to", f"127.0.0.1:{ports[0]}", "--mac", mac, "--rate", "1000",
             "--duration", str(migrate_after + 2.5), "--json", str(rep)],
        )  # fmt: skip
        procs.append(peer)
        time.sleep(migrate_after)
        mig = subprocess.run(
            [*cli, "migrate", "--qmp", str(qmp), f"tcp:127.0.0.1:{ports[2]}",
             "--report", str(mig_rep)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        peer_out, _ = peer.communicate(timeout=60)
        dst.communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for line in peer_out.splitlines():
        console.print(f"  {line}", highlight=False)
    if mig.returncode != 0 or not rep.exists() or not mig_rep.exists():
        console.print(f"[bold red]the VF act failed[/] {mig.stderr.strip()}", highlight=False)
        return False
    t, m = json.loads(rep.read_text()), json.loads(mig_rep.read_text())
    table = Table(title="netecho on a VF: the migration and what the peer saw")
    for col in ("migration", "downtime", "verify", "traffic", "longest gap", "guest RESULT"):
        table.add_column(col)
    ok_result = (
        t.get("guest") is not None and f"{t['guest']['result']:016x}" == t["expected_result"]
    )
    table.add_row(
        str(m.get("status")),
        f"{float(m.get('downtime', 0)):.1f} ms",
        str(m.get("verify", {}).get("status", "-")),
        f"sent {t['sent']}, lost {t['lost']}, corrupted {t['corrupted']}, dup {t['duplicated']}",
        f"{t['longest_gap_ms']:.1f} ms",
        "matches the peer" if ok_result else "differs",
    )
    console.print(table)
    return bool(t["lost"] == 0 and t["corrupted"] == 0 and t["duplicated"] == 0 and ok_result)
