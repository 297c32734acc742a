"""``vmferry run``: boot a guest image, or continue a saved one, and run it to its end."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, BinaryIO

from vmferry.errors import ConfigError, GuestError
from vmferry.kvm.system import DEFAULT_DEVICE
from vmferry.machine import GuestExit, Machine, MachineConfig, parse_size
from vmferry.migration.snapshot import load_from_file, save_to_file


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a guest image (or restore a saved one)",
        description="Run a multiboot guest image on KVM. Guest arguments go after '--'. "
        "The exit status is the value the guest wrote to the debug-exit port; vmferry's own "
        "errors exit with 125.",
    )
    p.add_argument(
        "image",
        nargs="?",
        help="built-in guest name (memtouch, cpustate, …) or path to a multiboot ELF",
    )
    p.add_argument("--memory", "-m", default="1G", help="guest RAM (default 1G)")
    p.add_argument("--vcpus", type=int, default=1, help="number of vCPUs, 1-8 (default 1)")
    p.add_argument(
        "--serial", metavar="FILE", help="write the guest's serial output to FILE (default: stdout)"
    )
    p.add_argument(
        "--save-after",
        nargs=2,
        metavar=("SECONDS", "FILE"),
        help="stop the VM after SECONDS and save its complete state to FILE",
    )
    p.add_argument(
        "--incoming", metavar="URI", help="restore a VM instead of booting one: file:PATH"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up (error) if the guest has not finished after this many seconds",
    )
    p.add_argument("--kvm-device", default=DEFAULT_DEVICE, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)


def _serial_out(path: str | None) -> BinaryIO:
    if path is None:
        return sys.stdout.buffer
    return open(path, "ab")


def _finish(result: GuestExit | None, timeout: float | None) -> int:
    if result is None:
        raise GuestError(f"the guest did not finish within {timeout} s")
    if result.error is not None:
        raise result.error
    assert result.code is not None
    return result.code & 0xFF


def cmd_run(args: argparse.Namespace) -> int:
    serial = _serial_out(args.serial)
    if args.incoming:
        if args.image or args.save_after:
            raise ConfigError(
                "--incoming takes no image and no --save-after: the VM's "
                "configuration comes from the stream"
            )
        scheme, _, where = args.incoming.partition(":")
        if scheme != "file" or not where:
            raise ConfigError(f"--incoming {args.incoming}: expected file:PATH")
        t0 = time.perf_counter()
        snap = load_from_file(where)
        machine = Machine.from_state(
            snap.state, snap.memory, kvm_device=args.kvm_device, serial=serial
        )
        print(
            f"vmferry: restored {snap.state.config.image or 'guest'} from {where} "
            f"({snap.ram.normal} pages, {snap.ram.zero} zero) in "
            f"{time.perf_counter() - t0:.3f} s",
            file=sys.stderr,
        )
        with machine:
            machine.start()
            return _finish(machine.wait(args.timeout), args.timeout)

    if not args.image:
        raise ConfigError("vmferry run needs a guest image (or --incoming file:PATH)")
    config = MachineConfig(
        memory=parse_size(args.memory),
        vcpus=args.vcpus,
        image=args.image,
        cmdline=args.guest_cmdline,
    )
    with Machine.boot(config, kvm_device=args.kvm_device, serial=serial) as machine:
        if not args.save_after:
            machine.start()
            return _finish(machine.wait(args.timeout), args.timeout)
        try:
            seconds = float(args.save_after[0])
        except ValueError:
            raise ConfigError(f"--save-after {args.save_after[0]}: not a number") from None
        path = args.save_after[1]
        machine.start()
        early = machine.wait(seconds)
        if early is not None:
            if early.error:
                raise early.error
            raise GuestError(
                f"the guest finished (exit {early.code}) before the save point "
                f"at {seconds} s; nothing was saved"
            )
        pause_s = machine.pause()
        t0 = time.perf_counter()
        stats = save_to_file(machine, path)
        dt = time.perf_counter() - t0
        print(
            f"vmferry: saved to {path}: {stats.bytes / 2**20:.1f} MiB ({stats.normal} pages, "
            f"{stats.zero} zero) in {dt:.3f} s (pause took {pause_s * 1e3:.1f} ms)",
            file=sys.stderr,
        )
        return 0
