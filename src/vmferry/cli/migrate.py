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

from rich.console import Console
from rich.live import Live

from vmferry.cli import migrate_postcopy, migrate_view
from vmferry.errors import ConfigError, MigrationError
from vmferry.qmp.client import QmpClient, QmpProtocolError
from vmferry.sizes import parse_size

POLL_S = 0.2
DONE = ("completed", "failed", "cancelled")


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
    migrate_view.summary(Console(), rep)
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
        with Live(migrate_view.progress(info), console=console, refresh_per_second=10) as live:
            while info.get("status") not in DONE:
                time.sleep(POLL_S)
                info = qmp.execute("query-migrate")
                live.update(migrate_view.progress(info))
    finally:
        if not console.is_terminal:
            # Off a terminal Live prints its last frame without ending the line: what comes
            # next on stderr (an error) would start on the frame's last row.
            console.line()
    rep: dict[str, Any] = qmp.execute("x-query-migrate-report")
    return rep
