"""What ``vmferry run`` checks before anything boots: a bad option, path or size is one
line and exit 125 while there is still no VM to lose."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

from vmferry.errors import ConfigError
from vmferry.machine import parse_size
from vmferry.machine.images import check_guest_args
from vmferry.memory.host_memory import HostMemory, check_guest_ram, check_prealloc
from vmferry.qmp.server import QmpServer

DEFAULT_MEMORY = "1G"
DEFAULT_VCPUS = 1
MIN_MEMORY = 16 << 20
RAM_ALIGN = 2 << 20  # guest RAM is mapped in 2 MiB units (GuestMemory)


def seconds(option: str, text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{option} {text}: not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{option} {text}: must be a positive, finite number of seconds")
    return value


def check_incoming(args: argparse.Namespace) -> None:
    """With --incoming the VM's configuration comes from the stream: say so rather than
    silently ignore what the user asked for."""
    given = [
        opt
        for opt, value in (
            ("guest image", args.image),
            ("--save-after", args.save_after),
            ("--memory", args.memory),
            ("--vcpus", args.vcpus is not None),
            ("--device", args.device),
            ("--overcommit", args.overcommit),
            ("guest arguments after '--'", args.guest_cmdline),
        )
        if value
    ]
    if given:
        listed = ", ".join(given[:-1]) + " or " + given[-1] if len(given) > 1 else given[0]
        raise ConfigError(
            f"--incoming takes no {listed}: the VM comes with its configuration "
            "(RAM, vCPUs, devices, command line) from the stream"
        )
    scheme, _, path = args.incoming.partition(":")
    if scheme == "file" and Path(path).is_dir():
        raise ConfigError(
            f"--incoming {args.incoming}: is a directory (give the file a save or a "
            "migration to file: wrote)"
        )
    if args.prealloc and not args.incoming.startswith("tcp:"):
        raise ConfigError(f"--prealloc is for --incoming tcp:HOST:PORT, not {args.incoming}")


def check_boot(args: argparse.Namespace) -> None:
    if args.prealloc:
        raise ConfigError("--prealloc is for --incoming tcp:HOST:PORT (a booted VM is sparse)")
    if args.x_device_version:
        raise ConfigError("--x-device-version is for a migration destination (--incoming)")
    check_guest_args(
        args.image, args.guest_cmdline, DEFAULT_VCPUS if args.vcpus is None else args.vcpus
    )


def memory_size(args: argparse.Namespace, host: HostMemory | None = None) -> int:
    """The guest's RAM (a bare number is MiB, as QEMU's -m), refused if this host could
    never back it (unless --overcommit)."""
    text = args.memory or DEFAULT_MEMORY
    size = parse_size(text, default_unit="M")
    if size < MIN_MEMORY or size % RAM_ALIGN:
        # In the user's own words (4K), not as a byte count.
        raise ConfigError(f"--memory {text}: must be at least 16 MiB and a multiple of 2 MiB")
    check_guest_ram(size, host or HostMemory.read(), overcommit=args.overcommit)
    return size


def prealloc_size(args: argparse.Namespace, host: HostMemory | None = None) -> int:
    if not args.prealloc:
        return 0
    size = parse_size(args.prealloc, default_unit="M")
    if size <= 0 or size % RAM_ALIGN:
        # 0 is refused rather than read as "none": leaving the option out says that.
        raise ConfigError(
            f"--prealloc {args.prealloc}: must be a positive multiple of 2 MiB (the VM's "
            "RAM size; leave --prealloc out for none)"
        )
    check_prealloc(size, host or HostMemory.read())
    return size


def check_save_path(path: str) -> None:
    """--save-after's FILE must be writable before the VM is stopped for it: the save goes
    to FILE.partial in the same directory, then replaces FILE."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--save-after {path}: is a directory (give a file name)")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"--save-after {path}: {parent} is not a directory")
    if not parent.is_dir():
        raise ConfigError(f"--save-after {path}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".vmferry-probe-")
    except OSError as e:
        raise ConfigError(f"--save-after {path}: cannot write in {parent}: {e.strerror}") from e
    os.close(fd)
    os.unlink(probe)


def open_serial(path: str | None) -> BinaryIO:
    if path is None:
        return sys.stdout.buffer
    p = Path(path)
    if p.parent.exists() and not p.parent.is_dir():
        raise ConfigError(f"--serial {path}: {p.parent} is not a directory")
    if not p.parent.is_dir():
        raise ConfigError(f"--serial {path}: directory {p.parent} does not exist")
    try:
        return open(path, "ab")
    except OSError as e:
        raise ConfigError(f"--serial {path}: {e.strerror}") from e


def listen_qmp(server: QmpServer) -> None:
    """Bind the QMP socket now, before the guest boots or a migration is awaited."""
    path = server.path
    if not Path(path).parent.is_dir():
        raise ConfigError(f"--qmp unix:{path}: directory {Path(path).parent} does not exist")
    try:
        server.listen()
    except FileExistsError as e:
        raise ConfigError(f"--qmp unix:{path}: {e}") from e
    except OSError as e:
        raise ConfigError(f"--qmp unix:{path}: {e.strerror or e}") from e
