"""``vmferry bench nic``: what a user of a VF's connection sees across a live migration.

netecho answers a traffic peer while the VM moves between two in-process hosts over
loopback; for each rate and DMA dirty-tracking mode: the longest gap between echoes next
to the measured downtime (target: gap ≤ downtime + 20 ms), frames lost outside the
downtime window (target: 0), and each mode's bytes and downtime as ratios to ``iommu``
in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from vmferry.bench.table import print_rows
from vmferry.traffic.lab import Outcome, close_hosts, make_hosts, migrate_under_traffic

MODES = ("iommu", "device", "mediated", "none")
RATES = (1000, 3000, 6000)
GAP_SLACK_MS = 20.0
COLUMNS = (
    "rate",
    "mode",
    "downtime-ms",
    "longest-gap-ms",
    "gap-minus-downtime-ms",
    "lost",
    "lost-outside-downtime",
    "reordered",
    "bytes",
    "bytes-ratio",
    "downtime-ratio",
)


def add_parser(which: Any) -> None:
    p = which.add_parser(
        "nic",
        help="a VF's traffic across a live migration: echo gap vs downtime, loss, mode costs",
        description="Migrate netecho with a VF under traffic at several rates in each DMA "
        "tracking mode (iommu, device, mediated, none); report the longest echo gap against "
        "the measured downtime, loss outside the downtime window, and bytes and downtime as "
        "ratios to iommu. About a minute.",
    )
    p.add_argument("--repeats", type=int, default=1, help="migrations per rate and mode (median)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench_nic)


def _lost_outside(o: Outcome) -> int:
    """Lost frames sent outside [pause, resume + slack]: the downtime window."""
    st = o.source.stats
    stop = next((r for r in st.rounds if r.stop_copy), None)
    if stop is None:
        return o.traffic.lost
    pause = o.source.started_at + stop.start_s - o.traffic.started_at  # same monotonic clock
    resume = pause + st.downtime_ms / 1e3 + GAP_SLACK_MS / 1e3
    return sum(1 for t in o.traffic.lost_at_s if not pause <= t <= resume)


def measure(rate: int, mode: str, hosts: list[Path]) -> dict[str, Any]:
    o = migrate_under_traffic(hosts, mode, rate=rate, before_s=1.0, after_s=0.8)
    st = o.source.stats
    if st.status != "completed":
        raise RuntimeError(f"{mode} at {rate}/s: migration {st.status}: {st.error}")
    t = o.traffic
    return {
        "rate": rate,
        "mode": mode,
        "downtime-ms": st.downtime_ms,
        "longest-gap-ms": t.longest_gap_ms,
        "gap-minus-downtime-ms": t.longest_gap_ms - st.downtime_ms,
        "lost": t.lost,
        "lost-outside-downtime": _lost_outside(o),
        "reordered": t.reordered,
        "bytes": st.transferred + st.device_transferred,
        "corrupted": t.corrupted,
        "duplicated": t.duplicated,
    }


def run(repeats: int, rates: tuple[int, ...] = RATES) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vmferry-bench-nic-") as d:
        hosts = make_hosts(Path(d))
        try:
            for rate in rates:
                # Modes interleaved within each repeat: drift on the host hits all alike.
                runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
                for _ in range(repeats):
                    for mode in MODES:
                        runs[mode].append(measure(rate, mode, hosts))
                med = {m: _median(rs) for m, rs in runs.items()}
                for mode in MODES:
                    row = med[mode]
                    row["bytes-ratio"] = row["bytes"] / max(med["iommu"]["bytes"], 1)
                    row["downtime-ratio"] = row["downtime-ms"] / max(
                        med["iommu"]["downtime-ms"], 1e-9
                    )
                    rows.append(row)
        finally:
            close_hosts(hosts)
    return rows


def _median(rs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rs[0])
    for k, v in rs[0].items():
        if isinstance(v, int | float) and k != "rate":
            out[k] = statistics.median(r[k] for r in rs)
    return out


def cmd_bench_nic(args: argparse.Namespace) -> int:
    rows = run(args.repeats)
    print_rows(
        f"vmferry bench nic: netecho + VF under traffic, median of {args.repeats} "
        f"(targets: gap ≤ downtime + {GAP_SLACK_MS:.0f} ms, no loss outside the downtime)",
        COLUMNS,
        rows,
        args.json,
    )
    return 0
