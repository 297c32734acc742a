"""The ``vmferry`` command: a thin front end over the library."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from vmferry import __version__
from vmferry.cli import bench as bench_cmd
from vmferry.cli import demo as demo_cmd
from vmferry.cli import mdev as mdev_cmd
from vmferry.cli import migrate as migrate_cmd
from vmferry.cli import run as run_cmd
from vmferry.cli import sriov as sriov_cmd
from vmferry.cli import tls as tls_cmd
from vmferry.cli import traffic as traffic_cmd
from vmferry.errors import VmferryError

# vmferry's own failures exit with this status (the guest's exit value is passed through).
EXIT_VMFERRY_ERROR = 125


class Parser(argparse.ArgumentParser):
    """Bad usage is bad input like any other: one line saying what was wrong, exit 125,
    rather than argparse's usage block and exit 2. Subparsers are made of this class too
    (add_subparsers defaults to the parser's own class), nested ones included."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_VMFERRY_ERROR, f"vmferry: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="vmferry",
        description="Run KVM guests and move them, running, from one process or host to another.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what vmferry does")
    p.add_argument("--version", action="version", version=f"vmferry {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    demo_cmd.add_parser(sub)
    mdev_cmd.add_parser(sub)
    sriov_cmd.add_parser(sub)
    traffic_cmd.add_parser(sub)
    migrate_cmd.add_parser(sub)
    tls_cmd.add_parser(sub)
    _remember_parsers(p)
    return p


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser, as a default in the namespace, so that an argument no
    parser took is refused by the innermost command's parser (which names its --help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(_parser=child)
                _remember_parsers(child)


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C, so the QMP socket goes and the VM is closed."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the guest's command line.
    guest_args: list[str] = []
    if "--" in args_list:
        i = args_list.index("--")
        args_list, guest_args = args_list[:i], args_list[i + 1 :]
    parser = build_parser()
    args, extra = parser.parse_known_args(args_list)
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    args.guest_cmdline = " ".join(guest_args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="vmferry: %(message)s"
    )
    # Handled like Ctrl-C (which unwinds through every cleanup), not the default of dying
    # on the spot with the QMP socket left behind.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        status: int = args.func(args)
        return status
    except VmferryError as e:
        print(f"vmferry: error: {e}", file=sys.stderr)
        return EXIT_VMFERRY_ERROR
    except Terminated:
        print("vmferry: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("vmferry: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
