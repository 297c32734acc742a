"""``vmferry sriov``: a host's PFs and their VFs (sriov_numvfs, MAC, VLAN, queues)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmferry.devices.nic.admin import listing
from vmferry.devices.nic.host import HostConfig
from vmferry.state_dir import default_state_dir


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sriov",
        help="SR-IOV NICs of this host: create VFs, set their MAC/VLAN, list them",
        description="Configure this host's physical functions and their virtual functions "
        "(kept in sriov.json in the state directory: $VMFERRY_STATE_DIR, /run/vmferry for "
        "root, else $XDG_RUNTIME_DIR/vmferry or /tmp/vmferry-$UID). A VM "
        "takes a VF with `vmferry run … --device vf,pf=PF,index=N`.",
    )
    p.add_argument("--state-dir", type=Path, help="the host's state directory")
    which = p.add_subparsers(dest="sriov", required=True)
    n = which.add_parser(
        "set-numvfs", help="create N VFs on a PF (0 removes them, and the PF's entry)"
    )
    n.add_argument("pf")
    n.add_argument("numvfs", type=int)
    n.add_argument("--uplink", metavar="HOST:PORT", help="UDP address of the host switch")
    n.add_argument(
        "--neighbour",
        action="append",
        metavar="HOST:PORT",
        help="another host's switch (or a peer) to announce migrated MACs to; repeat",
    )
    n.add_argument("--buffer", type=int, help="frames a port holds while its VF is stopped")
    n.set_defaults(func=cmd_set_numvfs)
    c = which.add_parser("config", help="set a VF's MAC, port VLAN or queue count")
    c.add_argument("pf")
    c.add_argument("index", type=int)
    c.add_argument("--mac")
    c.add_argument("--vlan", type=int)
    c.add_argument("--queues", type=int)
    c.set_defaults(func=cmd_config)
    ls = which.add_parser("list", help="the PFs, their VFs and which VM holds each")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)


def _host(args: argparse.Namespace) -> HostConfig:
    return HostConfig(args.state_dir or default_state_dir())


def cmd_set_numvfs(args: argparse.Namespace) -> int:
    pf = _host(args).set_numvfs(
        args.pf, args.numvfs, uplink=args.uplink, neighbours=args.neighbour, buffer=args.buffer
    )
    if args.numvfs == 0:
        print(f"{args.pf}: 0 VFs, removed from this host's SR-IOV state")
    else:
        print(f"{args.pf}: {len(pf.vfs)} VFs, uplink {pf.uplink}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    v = _host(args).config_vf(args.pf, args.index, mac=args.mac, vlan=args.vlan, queues=args.queues)
    print(f"{args.pf} VF {args.index}: mac {v.mac} vlan {v.vlan} queues {v.queues}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    data = listing(_host(args))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title=f"SR-IOV on this host ({_host(args).dir})")
    for col in ("pf", "vf", "mac", "vlan", "queues", "used by", "uplink"):
        table.add_column(col)
    for pf in data:
        for v in pf["vfs"]:
            table.add_row(
                pf["pf"],
                str(v["index"]),
                v["mac"],
                str(v["vlan"] or "-"),
                str(v["queues"]),
                f"pid {v['holder']}" if v["holder"] else "-",
                pf["uplink"],
            )
        if not pf["vfs"]:
            table.add_row(pf["pf"], "-", "-", "-", "-", "-", pf["uplink"])
    Console().print(table)
    return 0
