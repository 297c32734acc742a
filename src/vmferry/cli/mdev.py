"""``vmferry mdev types|create|remove|list``: the host's vGPUs, like the mdev sysfs files
(``mdev_supported_types/*/available_instances``, ``create``, ``remove``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vmferry.devices.vgpu import mdev
from vmferry.devices.vgpu.qmp import instance_json
from vmferry.devices.vgpu.types import DEFAULT_PARENT
from vmferry.machine.config import parse_size


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "mdev",
        help="create, list and remove vGPUs (mediated devices) on this host",
        description="vGPUs on this host's parent GPUs, shared by every vmferry process "
        f"through the state file in $VMFERRY_STATE_DIR (now {mdev.state_dir()}).",
    )
    which = p.add_subparsers(dest="mdev", required=True)
    types = which.add_parser("types", help="vGPU types and how many more of each fit")
    types.add_argument("--parent", default=DEFAULT_PARENT)
    types.add_argument("--json", action="store_true", help="print JSON")
    types.set_defaults(func=cmd_types)
    create = which.add_parser("create", help="create a vGPU (prints its UUID)")
    create.add_argument("type", help="vgpu-1, vgpu-2, vgpu-4 or vgpu-8")
    create.add_argument("--uuid", help="the vGPU's UUID (default: a new random one)")
    create.add_argument("--parent", default=DEFAULT_PARENT)
    create.add_argument(
        "--vram", type=parse_size, help="the parent's VRAM size (only while it has no vGPUs)"
    )
    create.set_defaults(func=cmd_create)
    remove = which.add_parser("remove", help="remove a vGPU no VM is using")
    remove.add_argument("uuid")
    remove.set_defaults(func=cmd_remove)
    lst = which.add_parser("list", help="the vGPUs on this host")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=cmd_list)


def cmd_types(args: argparse.Namespace) -> int:
    infos = mdev.list_types(args.parent)
    if args.json:
        print(json.dumps([t.to_dict() for t in infos], indent=1))
        return 0
    print(f"{'type':8} {'available':>9}  description (parent {args.parent})")
    for t in infos:
        print(f"{t.name:8} {t.available_instances:>9}  {t.description}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    inst = mdev.create(args.uuid, args.type, args.parent, args.vram)
    print(inst.uuid)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    mdev.remove(args.uuid)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    insts = mdev.list_instances()
    if args.json:
        print(json.dumps([instance_json(i) for i in insts], indent=1))
        return 0
    for i in insts:
        use = f"in use by {','.join(map(str, i.holders))}" if i.holders else "free"
        print(f"{i.uuid} {i.type:7} {i.parent} @{i.vram_offset >> 20}M {use}")
    return 0
