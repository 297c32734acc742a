"""A migration's timeline as a PNG: what each round sent, how fast the guest dirtied, and
where the downtime went.

Drawn on matplotlib's Agg canvas directly (no pyplot): no display, and no global backend
switched under whoever imported matplotlib before.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Final

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vmferry.migration.metrics import MigrationStats, RoundRecord

MIB: Final = 1 << 20
PRECOPY_COLOR: Final = "#4c72b0"
STOPCOPY_COLOR: Final = "#dd5533"
DEVICE_COLOR: Final = "#7b3294"
DIRTY_COLOR: Final = "#2a9d55"
BANDWIDTH_COLOR: Final = "#777777"
# A stop-copy of 50 ms in a 30 s migration would be invisible at its true width.
MIN_BAR_FRACTION: Final = 0.004
LABEL_THROTTLE_UP_TO: Final = 40  # rounds; more and the labels overlap
HEADROOM: Final = 1.3  # room above the tallest bar and line for the legend


def _title(stats: MigrationStats) -> str:
    head = f"migration {stats.status}: total {stats.total_ms / 1000:.2f} s"
    if stats.status == "completed":
        head += f", downtime {stats.downtime_ms:.0f} ms"
    head += f", {len(stats.rounds)} round{'s' if len(stats.rounds) != 1 else ''}"
    head += f", verify {stats.verify.status}"
    if stats.error:
        head += "\n" + textwrap.shorten(stats.error, 110)
    return head


def _breakdown(stats: MigrationStats) -> str:
    d = stats.downtime
    parts = [
        ("pause", d.pause_ms),
        ("final RAM", d.final_ram_ms),
        ("CPU state", d.cpu_state_ms),
        ("devices", d.device_state_ms),
        ("verify", d.verify_ms),
        ("resume", d.resume_ms),
    ]
    lines = [f"downtime {stats.downtime_ms:.1f} ms"]
    lines += [f"{name}: {ms:.1f} ms" for name, ms in parts if ms > 0]
    return "\n".join(lines)


def _bars(ax: Axes, rounds: list[RoundRecord], span_s: float) -> None:
    min_width = span_s * MIN_BAR_FRACTION
    for stop_copy, color, label in (
        (False, PRECOPY_COLOR, "pre-copy round"),
        (True, STOPCOPY_COLOR, "stop-and-copy"),
    ):
        chosen = [r for r in rounds if r.stop_copy == stop_copy]
        if not chosen:
            continue
        ax.bar(
            [r.start_s for r in chosen],
            [r.bytes / MIB for r in chosen],
            width=[max(r.duration_s, min_width) for r in chosen],
            align="edge",
            color=color,
            edgecolor="white",
            linewidth=0.5,
            label=label,
        )
    with_devices = [r for r in rounds if r.device_bytes]
    if with_devices:
        # Device state, drawn over the part of each bar it accounts for.
        ax.bar(
            [r.start_s for r in with_devices],
            [r.device_bytes / MIB for r in with_devices],
            width=[max(r.duration_s, min_width) for r in with_devices],
            align="edge",
            color=DEVICE_COLOR,
            edgecolor="white",
            linewidth=0.5,
            label="device state",
        )
    if len(rounds) <= LABEL_THROTTLE_UP_TO:
        for r in rounds:
            if r.throttle_pct:
                x = r.start_s + max(r.duration_s, min_width) / 2
                ax.annotate(
                    f"{r.throttle_pct}%",
                    (x, r.bytes / MIB),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )


def _rates(ax: Axes, rounds: list[RoundRecord]) -> None:
    mids = [r.start_s + r.duration_s / 2 for r in rounds]
    dirty = [r.dirty_rate / MIB for r in rounds]
    bandwidth = [r.bandwidth / MIB for r in rounds]
    style = "o-" if len(rounds) <= LABEL_THROTTLE_UP_TO else "-"
    ax.plot(mids, dirty, style, color=DIRTY_COLOR, label="dirty rate")
    ax.plot(mids, bandwidth, "--", color=BANDWIDTH_COLOR, label="bandwidth per round")
    ax.set_ylabel("MiB/s")
    ax.set_ylim(0, max([*dirty, *bandwidth, 1.0]) * HEADROOM)


def _downtime_window(ax: Axes, stats: MigrationStats) -> None:
    stop = next((r for r in stats.rounds if r.stop_copy), None)
    if stop is None:
        return  # failed or cancelled before stop-and-copy: there was no downtime
    width = stats.downtime_ms / 1000 if stats.downtime_ms > 0 else stop.duration_s
    ax.axvspan(stop.start_s, stop.start_s + width, color=STOPCOPY_COLOR, alpha=0.15, lw=0)
    ax.annotate(
        _breakdown(stats),
        xy=(stop.start_s + width / 2, ax.get_ylim()[1] * 0.95),
        # the window is usually at the right end; the box sits just left of it
        xytext=(0.9, 0.8),
        textcoords="axes fraction",
        ha="right",
        va="top",
        fontsize=8,
        bbox={"boxstyle": "round", "fc": "white", "ec": STOPCOPY_COLOR, "alpha": 0.9},
        arrowprops={"arrowstyle": "->", "color": STOPCOPY_COLOR},
    )


def plot_timeline(stats: MigrationStats, path: str | os.PathLike[str]) -> None:
    """Write the timeline of ``stats`` to ``path``, in the format its extension names
    (PNG without one)."""
    fig = Figure(figsize=(10, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rounds = sorted(stats.rounds, key=lambda r: r.start_s)
    end_s = max([stats.total_ms / 1000] + [r.start_s + r.duration_s for r in rounds])
    span_s = end_s if end_s > 0 else 1.0
    ax.set_xlim(0, span_s * 1.02)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("sent in round (MiB)")
    ax.set_title(_title(stats), fontsize=10)
    if not rounds:
        ax.text(0.5, 0.5, "no rounds recorded", transform=ax.transAxes, ha="center")
    else:
        _bars(ax, rounds, span_s)
        ax.set_ylim(0, max([r.bytes / MIB for r in rounds] + [1.0]) * HEADROOM)
        rates = ax.twinx()
        _rates(rates, rounds)
        _downtime_window(ax, stats)
        handles, labels = ax.get_legend_handles_labels()
        more_h, more_l = rates.get_legend_handles_labels()
        # on the twin: it is drawn last, so its lines do not cross the legend
        rates.legend(handles + more_h, labels + more_l, loc="upper center", fontsize=8, ncols=4)
    if stats.convergence:
        fig.supxlabel(textwrap.fill(stats.convergence, 140), fontsize=7, ha="center")
    # The format is the extension's (vmferry migrate --plot checks it is one Agg writes).
    fig.savefig(path, format=os.path.splitext(path)[1].removeprefix(".").lower() or "png")


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """The timeline from a JSON report (as ``vmferry migrate`` gets it over QMP)."""
    from vmferry.migration.report import stats_from_report

    plot_timeline(stats_from_report(report), path)
