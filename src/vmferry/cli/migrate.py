"""``vmferry migrate``: start a migration on a running vmferry over QMP and watch it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from vmferry.cli import migrate_postcopy
from vmferry.errors import ConfigError, MigrationError
from vmferry.migration.policy import rate, size
from vmferry.migration.report import NOT_REACHED, verify_status
from vmferry.qmp.client import QmpClient, QmpProtocolError
from vmferry.sizes import parse_size

POLL_S = 0.2
BAR_WIDTH = 60  # fits an 80-column terminal with room to spare
DONE = ("completed", "failed", "cancelled")
# The downtime not in any measured part gets a row when it is at least this much.
REST_MIN_MS = 1.0
REST_MIN_SHARE = 0.05


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help="live-migrate a running VM (over its QMP socket)",
        description="Start a live migration of the VM behind a QMP socket "
        "and show its progress (on stderr); print a summary at the end (on stdout).",
    )
    p.add_argument(
        "uri", help="tcp:HOST:PORT (a `vmferry run --incoming` waiting there) or file:PATH"
    )
    p.add_argument(
        "--qmp", required=True, metavar="SOCKET", help="the VM's QMP socket (unix:PATH or PATH)"
    )
    _add_tuning(p)
    migrate_postcopy.add_arguments(p)
    _add_verify_and_tls(p)
    p.add_argument(
        "--report", metavar="FILE", help="write the JSON report here (checked before starting)"
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the timeline here, in the format its extension names (png, svg, pdf, …)",
    )
    p.set_defaults(func=cmd_migrate)


def _add_tuning(p: argparse.ArgumentParser) -> None:
    """The migration's parameters: how it copies, how fast, when it gives up."""
    p.add_argument("--channels", type=int, help="parallel channels (multifd)")
    p.add_argument("--compress", choices=["none", "zstd"], help="compress pages")
    p.add_argument("--downtime-limit", type=int, metavar="MS", help="default 300")
    p.add_argument(
        "--max-bandwidth",
        metavar="SIZE",
        help="bytes per second, as 200M, 1.5G or 4096; 0 = unlimited (the default; "
        "QEMU's default is 128 MiB/s)",
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


def _add_verify_and_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        choices=["on", "strict", "off"],
        help="on (default): check what the dirty log cannot vouch for before resume and "
        "audit all RAM after; strict: all of it before resume; off: nothing",
    )
    p.add_argument("--no-verify", action="store_true", help="the same as --verify off")
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
    # mbps is megabits/s (QEMU's unit); shown in the MiB/s every other figure uses.
    t.add_row(
        "bandwidth now",
        rate(max(ram.get("mbps", 0), 0) * 1e6 / 8),
        "dirty rate",
        rate(ram.get("dirty-pages-rate", 0) * 4096),
    )
    t.add_row(
        "expected downtime",
        f"{info.get('expected-downtime', 0)} ms",
        "device state",
        size(info.get("vfio", {}).get("transferred", 0)),
    )
    note = migrate_postcopy.progress_rows(t, info)
    if note is not None:
        return Group(head, t, note)
    return Group(head, t)


def check_options(args: argparse.Namespace) -> None:
    """Values read here, before anything is asked of the VM: one line each."""
    if args.max_bandwidth is not None:
        try:
            args.max_bandwidth = parse_size(args.max_bandwidth)
        except ConfigError as e:
            raise ConfigError(f"--max-bandwidth {args.max_bandwidth}: {e}") from e
    migrate_postcopy.check_options(args)


def cmd_migrate(args: argparse.Namespace) -> int:
    path = args.qmp.removeprefix("unix:")
    # Refused while nothing has started: a report or plot that cannot be written, or a
    # file: URI in a missing directory, would otherwise fail only after the migration.
    check_options(args)
    check_uri(args.uri)
    report = check_output("--report", args.report) if args.report else None
    plot = check_plot(args.plot) if args.plot else None
    try:
        qmp = QmpClient(path)
    except (OSError, QmpProtocolError) as e:
        # Never connected: nothing about the source or its guest is known.
        raise MigrationError(f"cannot connect to the QMP socket {path}: {_why(e)}") from e
    with qmp:
        try:
            rep = _migrate(args, qmp)
        except (OSError, QmpProtocolError) as e:
            raise MigrationError(
                f"lost the QMP connection to the source at {path} ({_why(e)}): "
                f"{_why_source_ended(_last_events(qmp))}"
            ) from e
    # The summary is the command's result: on stdout (the progress view is on stderr).
    _summary(Console(), rep)
    if report is not None:
        _write_atomically(report, "the report", rep["status"], lambda t: _write_json(rep, t))
    if plot is not None:
        from vmferry.migration.plot import plot_report

        _write_atomically(plot, "the plot", rep["status"], lambda t: plot_report(rep, t))
    if rep["status"] != "completed":
        raise MigrationError(f"migration {rep['status']}: {rep.get('error-desc', '')}")
    return 0


def _why(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def _last_events(qmp: QmpClient) -> list[dict[str, Any]]:
    """The events the source sent, with those still unread: a write to a source that has
    hung up fails (EPIPE) before its last event (SHUTDOWN) is read."""
    with contextlib.suppress(OSError, QmpProtocolError, TimeoutError):
        qmp.events.append(qmp.wait_event("SHUTDOWN", timeout=1.0))
    return qmp.events


def _why_source_ended(events: list[dict[str, Any]]) -> str:
    """What the source said before its QMP connection went, from its last SHUTDOWN event
    (vmferry run sends one, as QEMU does, when a signal ends it)."""
    shutdown = next((ev for ev in reversed(events) if ev.get("event") == "SHUTDOWN"), None)
    if shutdown is None:
        return "the source process ended without saying why (it sent no SHUTDOWN event)"
    data = shutdown.get("data", {})
    if data.get("reason") == "host-signal":
        return "the source process was ended by a signal (SIGTERM or Ctrl-C)"
    return f"the source process shut down ({data.get('reason', 'no reason given')})"


def check_uri(uri: str) -> None:
    """A file: URI's directory must exist before the source is asked to write there."""
    scheme, _, rest = uri.partition(":")
    if scheme != "file" or not rest:
        return  # the source checks the rest (and refuses what it cannot parse)
    p = Path(rest)
    if p.is_dir():
        raise MigrationError(f"{uri}: is a directory (give a file name)")
    _check_dir(uri, p.parent)


def _check_dir(what: str, parent: Path) -> None:
    if not parent.exists():
        raise MigrationError(f"{what}: directory {parent} does not exist")
    if not parent.is_dir():
        raise MigrationError(f"{what}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MigrationError(f"{what}: cannot write in {parent}: permission denied")


def check_output(option: str, path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise MigrationError(f"{option} {path}: is a directory (give a file name)")
    _check_dir(f"{option} {path}", p.parent)
    return p


def check_plot(path: str) -> Path:
    """--plot's format comes from its extension: it must be one matplotlib can write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = check_output("--plot", path)
    ext = p.suffix.removeprefix(".").lower()
    formats = sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())
    if ext not in formats:
        raise MigrationError(
            f"--plot {path}: the extension must name an image format ({', '.join(formats)})"
        )
    return p


def _write_json(rep: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=2)
        f.write("\n")


def _write_atomically(path: Path, what: str, status: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file beside ``path``, renamed over it when whole: a write
    that fails (a full disk) leaves no half-written file behind."""
    # The temporary name ends in path's suffix: the plot's format is read from it.
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise MigrationError(f"migration {status}; cannot write {what} to {path}: {_why(e)}") from e
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise MigrationError(f"migration {status}; cannot write {what} to {path}: {_why(e)}") from e


def _migrate(args: argparse.Namespace, qmp: QmpClient) -> dict[str, Any]:
    console = Console(stderr=True)
    params: dict[str, Any] = {}
    for key, value in (
        ("multifd-channels", args.channels),
        ("multifd-compression", args.compress),
        ("downtime-limit", args.downtime_limit),
        ("max-bandwidth", args.max_bandwidth),
        ("x-switchover-timeout", args.switchover_timeout),
        ("x-switchover-policy", args.switchover_policy),
        ("x-peer-timeout", args.peer_timeout),
        ("x-verify", args.verify),
        ("x-postcopy-after", args.postcopy_after),
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
        *migrate_postcopy.capabilities(args.postcopy),
    ]
    qmp.execute("migrate-set-capabilities", capabilities=caps)
    if args.dest_qmp:
        migrate_postcopy.set_destination(args.dest_qmp)
    # A file: URI's path is resolved by the source process: make it absolute here.
    uri = args.uri
    if uri.startswith("file:") and len(uri) > len("file:"):
        uri = "file:" + os.path.abspath(uri.removeprefix("file:"))
    qmp.execute("migrate", uri=uri)
    if args.postcopy and args.postcopy_after is None:
        migrate_postcopy.start(qmp)
    info: dict[str, Any] = {"status": "setup"}
    try:
        with Live(_progress(info), console=console, refresh_per_second=10) as live:
            while info.get("status") not in DONE:
                time.sleep(POLL_S)
                info = qmp.execute("query-migrate")
                live.update(_progress(info))
    finally:
        if not console.is_terminal:
            # Off a terminal Live prints its last frame without ending the line: what comes
            # next on stderr (an error) would start on the frame's last row.
            console.line()
    rep: dict[str, Any] = qmp.execute("x-query-migrate-report")
    return rep


def _verification(rep: dict[str, Any]) -> str:
    v = rep.get("verify", {})
    x_verify = bool(rep.get("capabilities", {}).get("x-verify", False))
    x_verify = x_verify and rep.get("parameters", {}).get("x-verify", "on") != "off"
    status = verify_status(str(rep.get("status", "")), str(v.get("status", "off")), x_verify)
    if status == "failed":
        bad = v.get("first-mismatches", [])
        where = f" in pages {', '.join(str(p) for p in bad)}" if bad else ""
        cpu = "; vCPU state differs" if v.get("cpu-state") == "failed" else ""
        return f"failed{where}{cpu} ({v.get('pages-checked', 0)} pages checked)"
    audit = v.get("phases", {}).get("audit")
    if status == "passed" and audit:
        pre = v["phases"].get("pre-resume", {})
        return (
            f"passed ({pre.get('pages', 0)} pages before resume in {pre.get('ms', 0):.1f} ms, "
            f"{audit.get('pages', 0)} audited after resume in {audit.get('ms', 0):.1f} ms)"
        )
    if status == "passed":
        return f"passed ({v.get('pages-checked', 0)} pages checked)"
    if status == "deferred":
        return f"deferred: {v.get('detail', 'checked when the file is restored')}"
    if status == NOT_REACHED:
        # Verification was asked for; it runs at the switchover, which was never reached.
        return f"not reached (the migration {rep.get('status', 'ended')} before it)"
    return status


def _average_rate(rep: dict[str, Any]) -> str:
    ms = rep.get("total-time", 0)
    sent = rep.get("ram", {}).get("transferred", 0)
    return f"{rate(sent * 1000 / ms)} over the whole migration" if ms > 0 else "-"


def _downtime_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    """The downtime's parts, and what the measured parts leave of the total (the source
    waiting on the destination's answer; after a failure, the wait that ended it), so that
    the rows add up."""
    parts = dict(rep.get("downtime-breakdown", {}))
    total = parts.pop("total", None)
    rows = [(f"  downtime: {k}", f"{v:.1f} ms") for k, v in parts.items() if v >= 0.05]
    if total is None:
        return rows
    rest = total - sum(parts.values())
    # A remainder of bookkeeping (a fraction of a ms) is not worth a row of its own.
    if rest >= REST_MIN_MS and rest >= REST_MIN_SHARE * total:
        what = (
            "waiting for the destination"
            if rep.get("status") == "completed"
            else "waiting for the destination, until the failure"
        )
        rows.append((f"  downtime: {what}", f"{rest:.1f} ms"))
    if rows:
        rows.append(("  downtime: total", f"{total:.1f} ms"))
    return rows


def _summary(console: Console, rep: dict[str, Any]) -> None:
    t = Table(title=f"migration {rep['status']}")
    t.add_column("")
    t.add_column("")
    ram = rep.get("ram", {})
    rounds = rep.get("rounds", [])
    last: dict[str, Any] = rounds[-1] if rounds else {}
    # Measured, unlike the stop-copy bandwidth the convergence line expected.
    last_name = "stop-and-copy bandwidth" if last.get("stop-copy") else "last round's bandwidth"
    rows = [
        ("total time", f"{rep.get('total-time', 0)} ms"),
        ("downtime", f"{rep.get('downtime', '-')} ms"),
        # The figure the progress view showed as "sync rounds".
        ("sync rounds", str(ram.get("dirty-sync-count", len(rounds)))),
        ("RAM sent", size(ram.get("transferred", 0))),
        ("average bandwidth", _average_rate(rep)),
        (last_name, rate(max(last.get("bandwidth", 0), 0)) if rounds else "-"),
        ("verification", _verification(rep)),
        ("convergence", rep.get("convergence", "")),
    ]
    rows += _downtime_rows(rep)
    rows += migrate_postcopy.summary_rows(rep)
    if rep.get("error-desc"):
        rows.append(("error", rep["error-desc"]))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
