"""What `vmferry migrate` shows: the progress view while the migration runs (stderr) and
the summary table when it ends (its result, on stdout)."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table

from vmferry.cli import migrate_postcopy
from vmferry.migration.policy import rate, size
from vmferry.migration.report import NOT_REACHED, verify_status

BAR_WIDTH = 60  # fits an 80-column terminal with room to spare
# The downtime not in any measured part gets a row when it is at least this much.
REST_MIN_MS = 1.0
REST_MIN_SHARE = 0.05


def progress(info: dict[str, Any]) -> Group:
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


def verification(rep: dict[str, Any]) -> str:
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


def summary(console: Console, rep: dict[str, Any]) -> None:
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
        ("verification", verification(rep)),
        ("convergence", rep.get("convergence", "")),
    ]
    rows += _downtime_rows(rep)
    rows += migrate_postcopy.summary_rows(rep)
    if rep.get("error-desc"):
        rows.append(("error", rep["error-desc"]))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
