"""What ``vmferry bench migrate`` measured, the issue's targets as pure functions of it,
and the tables (terminal and Markdown) — no I/O, no clocks, so all of it is tested
without a VM.

Every figure of a case is the median of that VMM's good runs (completed, with the
reference RESULT) with their range; ratios are vmferry's median over QEMU's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MB = 1e6
GIB = 1 << 30
# Targets (issue 10).
TOTAL_TARGET = 0.5  # vmferry total time ≤ 0.5 × QEMU's
DOWNTIME_TARGET = 1.0  # vmferry downtime ≤ QEMU's
INDEPENDENCE_TARGET = 1.2  # downtime at the largest guest ≤ 1.2 × at the smallest
RAW_TARGET = 0.9  # round 0 of a paused guest ≥ 0.9 × raw loopback TCP


@dataclass
class VmmRun:
    """One migration by one VMM. Times in ms as each VMM reports them; -1 = none."""

    vmm: str  # "qemu" | "vmferry"
    status: str
    total_ms: float
    downtime_ms: float
    result_ok: bool = False
    result: str = ""
    order: int = 0  # its place in the case's ABBA sequence
    stop_to_resume_ms: float = -1.0  # QEMU only: source STOP event → destination RESUME
    rounds: int = 0  # vmferry: rounds with the stop-copy; QEMU: dirty-sync-count
    transferred: int = 0
    setup_ms: float = -1.0
    round0_rate: float = -1.0  # bytes/s (how: see docs/benchmarks.md)
    expected_downtime_ms: float = -1.0  # vmferry: the policy's last figure
    breakdown: dict[str, float] = field(default_factory=dict)  # vmferry's downtime parts
    verify: dict[str, Any] = field(default_factory=dict)  # vmferry: report["verify"]
    error: str = ""

    @property
    def good(self) -> bool:
        return self.status == "completed" and self.result_ok

    def phase(self, name: str) -> dict[str, Any] | None:
        """A verification phase ("pre-resume", "audit") as the report gives it, or None."""
        phases = self.verify.get("phases")
        got = phases.get(name) if isinstance(phases, dict) else None
        return got if isinstance(got, dict) else None


@dataclass(frozen=True)
class Spread:
    """Median and range of some runs' figure; n = 0: no run had it."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        ok = [v for v in values if v >= 0 and math.isfinite(v)]
        if not ok:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(ok), min(ok), max(ok), len(ok))

    def text(self, fmt: Callable[[float], str]) -> str:
        """``812 (790–830)``; one run: ``812``; none: ``-``."""
        if not self.n:
            return "-"
        if self.n == 1 or self.low == self.high:
            return fmt(self.median)
        return f"{fmt(self.median)} ({fmt(self.low)}–{fmt(self.high)})"


@dataclass
class CaseResult:
    memory: int
    workload: str  # the workload's key (idle, wss256, wss1g-512)
    title: str  # what it is, in words
    cmdline: str
    reference: str
    downtime_limit_ms: int
    runs: list[VmmRun] = field(default_factory=list)  # in the order run
    skipped: str = ""  # why the case did not run (not enough memory), else ""

    @property
    def label(self) -> str:
        return f"{self.memory // GIB} GiB, {self.workload}"

    def good(self, vmm: str) -> list[VmmRun]:
        return [r for r in self.runs if r.vmm == vmm and r.good]

    def spread(self, vmm: str, figure: Callable[[VmmRun], float]) -> Spread:
        return Spread.of([figure(r) for r in self.good(vmm)])

    def ratio(self, figure: Callable[[VmmRun], float]) -> float:
        return ratio(self.spread("vmferry", figure).median, self.spread("qemu", figure).median)

    @property
    def total_ratio(self) -> float:
        return self.ratio(_total)

    @property
    def downtime_ratio(self) -> float:
        return self.ratio(_downtime)

    @property
    def within_limit(self) -> bool | None:
        """vmferry's downtime within downtime-limit in every good run (None: no run)."""
        return within_limit([r.downtime_ms for r in self.good("vmferry")], self.downtime_limit_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "label": self.label,
            "total_ratio": json_num(self.total_ratio),
            "downtime_ratio": json_num(self.downtime_ratio),
            "within_limit": self.within_limit,
        }


@dataclass
class ThroughputResult:
    """Part 1: round 0 of a paused, filled guest against raw loopback TCP."""

    channels: int
    round0_bytes: int
    round0_rate: float  # bytes/s, median of the repeats
    round0_rates: list[float]
    end_to_end_rate: float  # all bytes ÷ total-time, median
    raw_rate: float  # bytes/s over as many streams as channels, median
    raw_rates: list[float]
    raw_one_stream_rate: float

    @property
    def round0_ratio(self) -> float:
        return ratio(self.round0_rate, self.raw_rate)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "round0_ratio": json_num(self.round0_ratio)}


# ---- the targets -----------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if a >= 0 and b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def json_num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def meets(value: float, target: float, *, at_most: bool = True) -> bool | None:
    """A ratio against its target; None when there is no ratio (a side did not run)."""
    if not math.isfinite(value):
        return None
    return value <= target if at_most else value >= target


def within_limit(downtimes_ms: Sequence[float], limit_ms: int) -> bool | None:
    if not downtimes_ms:
        return None
    return all(0 <= d <= limit_ms for d in downtimes_ms)


@dataclass(frozen=True)
class Independence:
    """vmferry's downtime at the largest guest over that at the smallest, one workload."""

    workload: str
    small: int  # bytes
    large: int
    small_ms: float
    large_ms: float

    @property
    def ratio(self) -> float:
        return ratio(self.large_ms, self.small_ms)

    @property
    def label(self) -> str:
        return f"{self.large // GIB} GiB ÷ {self.small // GIB} GiB"


def independence(cases: Sequence[CaseResult]) -> list[Independence]:
    """Per workload run at two sizes or more: the largest against the smallest, medians."""
    out = []
    for workload in dict.fromkeys(c.workload for c in cases):
        ran = sorted(
            (c for c in cases if c.workload == workload and c.good("vmferry")),
            key=lambda c: c.memory,
        )
        if len(ran) < 2:
            continue
        lo, hi = ran[0], ran[-1]
        lo_ms = lo.spread("vmferry", _downtime).median
        hi_ms = hi.spread("vmferry", _downtime).median
        out.append(Independence(workload, lo.memory, hi.memory, lo_ms, hi_ms))
    return out


# ---- presentation ----------------------------------------------------------------------


def ms(value: float) -> str:
    return "-" if value < 0 or not math.isfinite(value) else f"{value:,.0f}"


def mbs(rate: float) -> str:
    return "-" if rate <= 0 or not math.isfinite(rate) else f"{rate / MB:,.0f}"


def x(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.2f}"


def count(value: float) -> str:
    """A median count: ``3``, ``2.5``; ``-`` for none."""
    return "-" if not math.isfinite(value) else f"{value:g}"


def mark(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def _phase_text(runs: list[VmmRun], name: str) -> str:
    """``1,204 p / 3 ms`` (median pages / median ms over the runs that had the phase)."""
    phases = [p for p in (r.phase(name) for r in runs) if p is not None]
    if not phases:
        return "-"
    pages = Spread.of([float(p.get("pages", -1)) for p in phases])
    took = Spread.of([float(p.get("ms", -1)) for p in phases])
    return f"{pages.text(lambda v: f'{v:,.0f}')} p / {took.text(ms)} ms"


THROUGHPUT_COLUMNS = (
    "channels",
    "vmferry round 0 MB/s",
    "vmferry end-to-end MB/s",
    "raw TCP MB/s (same streams)",
    "raw TCP 1 stream MB/s",
    "round 0 / raw",
    "≥ 0.9?",
)
CASE_COLUMNS = (
    "guest",
    "workload",
    "vmferry total ms",
    "QEMU total ms",
    "total ratio",
    "≤ 0.5?",
    "vmferry downtime ms",
    "QEMU downtime ms",
    "downtime ratio",
    "≤ 1?",
    "within limit?",
    "vmferry expected downtime ms",
    "verify pre-resume",
    "verify audit",
    "setup ms (vmferry / QEMU)",
    "round 0 MB/s (vmferry / QEMU)",
    "good runs (vmferry / QEMU)",
)
INDEPENDENCE_COLUMNS = ("workload", "sizes", "vmferry downtime ms", "ratio", "≤ 1.2?")


def throughput_rows(results: Sequence[ThroughputResult]) -> list[list[str]]:
    return [
        [
            str(t.channels),
            Spread.of(t.round0_rates).text(lambda v: mbs(v)),
            mbs(t.end_to_end_rate),
            Spread.of(t.raw_rates).text(lambda v: mbs(v)),
            mbs(t.raw_one_stream_rate),
            x(t.round0_ratio),
            mark(meets(t.round0_ratio, RAW_TARGET, at_most=False)),
        ]
        for t in results
    ]


def _count(c: CaseResult, vmm: str) -> str:
    return f"{len(c.good(vmm))}/{sum(1 for r in c.runs if r.vmm == vmm)}"


Figure = Callable[[VmmRun], float]


def _total(r: VmmRun) -> float:
    return r.total_ms


def _downtime(r: VmmRun) -> float:
    return r.downtime_ms


def _expected(r: VmmRun) -> float:
    return r.expected_downtime_ms


def _setup(r: VmmRun) -> float:
    return r.setup_ms


def _round0(r: VmmRun) -> float:
    return r.round0_rate


def case_row(c: CaseResult) -> list[str]:
    guest = f"{c.memory // GIB} GiB"
    if c.skipped:
        return [guest, c.workload, *(["-"] * (len(CASE_COLUMNS) - 3)), f"skipped: {c.skipped}"]

    def v(figure: Figure) -> Spread:
        return c.spread("vmferry", figure)

    def q(figure: Figure) -> Spread:
        return c.spread("qemu", figure)

    within = c.within_limit
    limit = "-" if within is None else f"{mark(within)} (max {ms(v(_downtime).high)})"
    good = c.good("vmferry")
    return [
        guest,
        c.workload,
        v(_total).text(ms),
        q(_total).text(ms),
        x(c.total_ratio),
        mark(meets(c.total_ratio, TOTAL_TARGET)),
        v(_downtime).text(ms),
        q(_downtime).text(ms),
        x(c.downtime_ratio),
        mark(meets(c.downtime_ratio, DOWNTIME_TARGET)),
        limit,
        v(_expected).text(ms),
        _phase_text(good, "pre-resume"),
        _phase_text(good, "audit"),
        f"{ms(v(_setup).median)} / {ms(q(_setup).median)}",
        f"{mbs(v(_round0).median)} / {mbs(q(_round0).median)}",
        f"{_count(c, 'vmferry')} / {_count(c, 'qemu')}",
    ]


def case_rows(cases: Sequence[CaseResult]) -> list[list[str]]:
    return [case_row(c) for c in cases]


def independence_rows(items: Sequence[Independence]) -> list[list[str]]:
    return [
        [
            i.workload,
            i.label,
            f"{ms(i.large_ms)} ÷ {ms(i.small_ms)}",
            x(i.ratio),
            mark(meets(i.ratio, INDEPENDENCE_TARGET)),
        ]
        for i in items
    ]


def errors(cases: Sequence[CaseResult]) -> list[str]:
    """One line per run that failed or printed the wrong RESULT."""
    return [
        f"{c.label}: {r.vmm} run {r.order + 1}: {r.error or r.status}"
        for c in cases
        for r in c.runs
        if not r.good
    ]


def breakdown_rows(cases: Sequence[CaseResult]) -> list[list[str]]:
    """vmferry's downtime in its parts (medians), to see where the window went."""
    keys = ("pause", "device-state", "final-ram", "cpu-state", "verify", "resume")
    rows = []
    for c in cases:
        good = c.good("vmferry")
        if not good:
            continue
        cells = [Spread.of([r.breakdown.get(k, -1.0) for r in good]).median for k in keys]
        rounds = Spread.of([float(r.rounds) for r in good]).median
        syncs = c.spread("qemu", lambda r: float(r.rounds)).median
        rows.append([c.label, *(ms(v) for v in cells), f"{count(rounds)} / {count(syncs)}"])
    return rows


BREAKDOWN_COLUMNS = (
    "case",
    "pause",
    "device state",
    "final RAM",
    "CPU state",
    "verify",
    "resume",
    "rounds vmferry / QEMU dirty syncs",
)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


__all__ = [
    "CASE_COLUMNS",
    "CaseResult",
    "Independence",
    "Spread",
    "ThroughputResult",
    "VmmRun",
    "case_rows",
    "independence",
    "markdown_table",
    "meets",
    "within_limit",
]
