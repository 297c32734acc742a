"""``vmferry migrate --postcopy``: post-copy as QEMU's users drive it — postcopy-ram on
both sides, ``migrate``, then ``migrate-start-postcopy`` (the engine switches when the
round in flight ends) — or vmferry's ``--postcopy-after`` (x-postcopy-after: switch only
if pre-copy has not converged by then). And what the progress view and the summary show
of it."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from rich.table import Table

from vmferry.errors import ConfigError, MigrationError
from vmferry.migration.policy import size
from vmferry.migration.postcopy_policy import parse_postcopy_after
from vmferry.qmp.backend import QmpError
from vmferry.qmp.client import QmpClient, QmpProtocolError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="set postcopy-ram (on the destination too with --dest-qmp) and switch to "
        "post-copy when the first round ends: the VM runs at the destination, which "
        "asks for the pages it still lacks",
    )
    p.add_argument(
        "--postcopy-after",
        metavar="N|TIME|N,TIME",
        help="post-copy only if pre-copy has not converged after N rounds, a time (30s, "
        "500ms) or whichever comes first (5,30s); implies --postcopy",
    )
    p.add_argument(
        "--dest-qmp",
        metavar="SOCKET",
        help="the destination's QMP socket (unix:PATH or PATH): --postcopy sets the "
        "capability there too, as QEMU needs it on both sides",
    )


def check_options(args: argparse.Namespace) -> None:
    """Refused before anything is asked of either VM, one line each."""
    if args.postcopy_after is not None:
        parse_postcopy_after(args.postcopy_after)  # names x-postcopy-after and the text
        args.postcopy = True
    if args.dest_qmp is not None and not args.postcopy:
        raise ConfigError("--dest-qmp is used only with --postcopy (or --postcopy-after)")
    if not args.postcopy:
        return
    if args.uri.startswith("file:"):
        raise ConfigError(
            f"--postcopy: {args.uri} is a file; post-copy needs a destination VM that runs "
            "and asks for its pages (tcp:HOST:PORT)"
        )
    if args.verify == "strict":
        raise ConfigError(
            "--postcopy with --verify strict: strict checks all of RAM before the resume, "
            "which post-copy sends after it; use --verify on (the audit after the last "
            "page) or off"
        )


def capabilities(on: bool) -> list[dict[str, Any]]:
    # The blocktime figures come with it: what post-copy cost the guest is the point.
    return [
        {"capability": "postcopy-ram", "state": on},
        {"capability": "postcopy-blocktime", "state": on},
    ]


def _why(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def set_destination(dest_qmp: str) -> None:
    """postcopy-ram on the destination too, through its QMP socket, before the migration
    starts (a destination that waits with --incoming defer or tcp: answers QMP)."""
    path = dest_qmp.removeprefix("unix:")
    try:
        with QmpClient(path) as dest:
            dest.execute("migrate-set-capabilities", capabilities=capabilities(True))
    except (OSError, QmpProtocolError) as e:
        raise MigrationError(
            f"--dest-qmp: cannot reach the destination's QMP socket {path}: {_why(e)}"
        ) from e
    except QmpError as e:
        raise MigrationError(f"--dest-qmp: the destination refused postcopy-ram: {e}") from e


def start(qmp: QmpClient) -> None:
    """migrate-start-postcopy right after migrate: the engine switches when the round in
    flight (the first: all of RAM) ends. If it is refused the migration is cancelled: the
    VM runs on here rather than migrating in a way that was not asked for."""
    try:
        qmp.execute("migrate-start-postcopy")
    except QmpError as e:
        with contextlib.suppress(QmpError):
            qmp.execute("migrate_cancel")
        raise MigrationError(f"{e} (the migration was cancelled: the VM runs on here)") from e


def progress_rows(t: Table, info: dict[str, Any]) -> Table | None:
    """Post-copy's figures in the progress table; a note to show below it when the link
    broke (nothing is lost, but nothing moves until both sides are told where to meet)."""
    status = str(info.get("status", ""))
    if not status.startswith("postcopy-"):
        return None
    ram = info.get("ram", {})
    t.add_row(
        "page requests",
        str(ram.get("postcopy-requests", 0)),
        "sent in post-copy",
        size(ram.get("postcopy-bytes", 0)),
    )
    t.add_row("vCPU blocktime", f"{info.get('postcopy-blocktime', 0)} ms", "", "")
    if status != "postcopy-paused":
        return None
    note = Table.grid()
    note.add_row(
        "link broken: run migrate-recover URI on the destination, then migrate with "
        "resume: true here"
    )
    return note


def summary_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    """What post-copy did, when it happened: when it switched, what it still owed, how
    the pages went (asked for, pushed) and what the guest waited."""
    pc = rep.get("postcopy", {})
    if not pc.get("active"):
        return []
    rows = [
        ("post-copy: switched at", f"{pc.get('switch-time', 0):.2f} s"),
        ("post-copy: pages owed at the switch", str(pc.get("owed-pages", 0))),
        (
            "post-copy: page requests",
            f"{pc.get('requests', 0)} ({pc.get('urgent-pages', 0)} pages sent for them)",
        ),
        ("post-copy: pages pushed", str(pc.get("pushed-pages", 0))),
        ("post-copy: sent after the switch", size(pc.get("bytes", 0))),
        ("post-copy: vCPU blocktime", f"{pc.get('blocktime', 0):.1f} ms"),
    ]
    lat = pc.get("latency", {})
    if lat:
        parts = [f"{k} {lat[k]:.2f} ms" for k in ("p50", "p99", "max") if k in lat]
        rows.append(("post-copy: request latency", " / ".join(parts)))
    if pc.get("recoveries"):
        rows.append(("post-copy: links re-made", str(pc["recoveries"])))
    if pc.get("complete-time"):
        rows.append(("post-copy: last page at", f"{pc['complete-time']:.2f} s"))
    return rows
