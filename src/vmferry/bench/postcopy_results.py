"""``vmferry bench postcopy``'s results: one run, a case's runs, the issue's targets as
ratios, and the tables (targets first, misses at the top). Pure: no processes here."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vmferry.bench.migrate_results import markdown_table
from vmferry.bench.postcopy_plan import CASE_BY_KEY, MB, Case
from vmferry.bench.postcopy_progress import PhaseRates

NAN = math.nan
# The targets (issue 11).
ONCE_LIMIT = 1.5  # post-copy total ≤ 1.5 × (guest RAM ÷ measured bandwidth)
VS_QEMU_LIMIT = 0.5  # vmferry's post-copy total ≤ 0.5 × QEMU's
DOWNTIME_LIMIT = 1.0  # post-copy downtime ≤ pre-copy downtime, same guest
LATENCY_P99_LIMIT_MS = 5.0


@dataclass
class Run:
    """One migration of one case, as the VMM reported it and the guest lived it."""

    case: str
    repeat: int
    status: str  # the migration's last status; "error" when the bench could not run it
    memory: int = 0  # guest RAM, bytes
    total_ms: float = NAN
    downtime_ms: float = NAN
    round0_rate: float = NAN  # bytes/s: round 0's bytes ÷ its time (the measured bandwidth)
    rounds: int = 0
    transferred: int = 0
    throttle_pct: int = 0  # the highest auto-converge throttle seen
    switch_ms: float = NAN  # migration start → post-copy began
    requests: int = 0  # page requests served after the switch
    postcopy_bytes: int = 0
    blocktime_ms: float = NAN  # vCPU time waiting for pages (QEMU: postcopy-blocktime)
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max
    rates: PhaseRates | None = None
    verify: str = ""  # vmferry's verification status
    error: str = ""

    @property
    def good(self) -> bool:
        bad = self.rates.bad_pages if self.rates is not None else 0
        return self.status == "completed" and not self.error and bad == 0

    @property
    def once_ratio(self) -> float:
        """Total time ÷ the time to send the guest's RAM once at round 0's rate."""
        if not (self.round0_rate > 0 and self.memory > 0 and self.total_ms > 0):
            return NAN
        return (self.total_ms / 1e3) / (self.memory / self.round0_rate)

    @property
    def postcopy_rate(self) -> float:
        """Bytes/s the source sent after the switch: whether the cap held there too."""
        took_s = (self.total_ms - self.switch_ms) / 1e3
        return self.postcopy_bytes / took_s if self.postcopy_bytes and took_s > 0 else NAN

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rates"] = None if self.rates is None else asdict(self.rates)
        d["good"] = self.good
        d["once_ratio"] = self.once_ratio
        d["postcopy_rate"] = self.postcopy_rate
        out: dict[str, Any] = _finite(d)
        return out


def _finite(value: Any) -> Any:
    """NaN → None, all the way down (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass
class CaseResult:
    key: str
    runs: list[Run] = field(default_factory=list)
    skipped: str = ""  # why the case could not run at all

    @property
    def case(self) -> Case:
        return CASE_BY_KEY[self.key]

    def good_runs(self) -> list[Run]:
        return [r for r in self.runs if r.good]

    def values(self, get: Callable[[Run], float]) -> list[float]:
        return [v for v in (get(r) for r in self.good_runs()) if math.isfinite(v)]

    def median(self, get: Callable[[Run], float]) -> float:
        vs = self.values(get)
        return statistics.median(vs) if vs else NAN

    def why_no_figures(self) -> str:
        """Why this case has no figure: skipped, or every run failed (the first reason)."""
        if self.skipped:
            return f"skipped: {self.skipped}"
        if not self.runs:
            return "not run"
        bad = [r for r in self.runs if not r.good]
        if len(bad) < len(self.runs):
            return ""
        r = bad[0]
        pages = r.rates.bad_pages if r.rates is not None else 0
        return r.error or (f"{pages} bad pages" if pages else r.status)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.key, "skipped": self.skipped, "runs": [r.to_dict() for r in self.runs]}


# ---- the targets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    what: str
    value: float  # NaN: not measured (see note)
    limit: float  # NaN: shown for comparison, no target
    note: str = ""

    @property
    def verdict(self) -> str:
        if math.isnan(self.limit):
            return "info"
        if math.isnan(self.value):
            return "n/a"
        return "met" if self.value <= self.limit else "MISS"


_VERDICT_ORDER = {"MISS": 0, "n/a": 1, "met": 2, "info": 3}


def _ratio(a: CaseResult, b: CaseResult, get: Callable[[Run], float]) -> tuple[float, str]:
    """median(a) ÷ median(b), or NaN and why not."""
    for c in (a, b):
        why = c.why_no_figures()
        if why:
            return NAN, f"{c.key}: {why}"
    num, den = a.median(get), b.median(get)
    if not (math.isfinite(num) and den > 0):
        return NAN, f"{a.key} or {b.key}: not measured"
    return num / den, f"{num:,.0f} ÷ {den:,.0f}"


def _median_of(c: CaseResult, get: Callable[[Run], float]) -> tuple[float, str]:
    why = c.why_no_figures()
    if why:
        return NAN, f"{c.key}: {why}"
    v = c.median(get)
    return v, "" if math.isfinite(v) else f"{c.key}: not reported"


def targets(cases: dict[str, CaseResult]) -> list[Target]:
    """The issue's targets from the cases' medians, misses first."""
    vpc, vpre = cases["vmferry-postcopy"], cases["vmferry-precopy"]
    qpc, qpre = cases["qemu-postcopy"], cases["qemu-precopy"]
    out = []
    v, note = _median_of(vpc, lambda r: r.once_ratio)
    out.append(Target("vmferry post-copy total ÷ (RAM ÷ round-0 rate)", v, ONCE_LIMIT, note))
    v, note = _median_of(qpc, lambda r: r.once_ratio)
    out.append(Target("QEMU post-copy total ÷ (RAM ÷ round-0 rate)", v, NAN, note))
    v, note = _ratio(vpc, qpc, lambda r: r.total_ms)
    out.append(Target("vmferry post-copy total ÷ QEMU post-copy total", v, VS_QEMU_LIMIT, note))
    v, note = _ratio(vpc, vpre, lambda r: r.downtime_ms)
    out.append(Target("vmferry post-copy downtime ÷ pre-copy downtime", v, DOWNTIME_LIMIT, note))
    v, note = _ratio(qpc, qpre, lambda r: r.downtime_ms)
    out.append(Target("QEMU post-copy downtime ÷ pre-copy downtime", v, NAN, note))
    gap = _rate(lambda p: p.handover_s * 1e3)
    for vmm, pc, pre in (("vmferry", vpc, vpre), ("QEMU", qpc, qpre)):
        v, note = _ratio(pc, pre, gap)
        out.append(Target(f"{vmm} post-copy ÷ pre-copy guest gap at the switch", v, NAN, note))
    v, note = _median_of(vpc, lambda r: r.latency_ms.get("p99", NAN))
    out.append(Target("vmferry page-request latency p99 (ms)", v, LATENCY_P99_LIMIT_MS, note))
    bad = sum(r.rates.bad_pages for c in cases.values() for r in c.runs if r.rates is not None)
    runs = sum(1 for c in cases.values() for r in c.runs if r.rates is not None)
    out.append(Target("pages the guest found wrong, all runs", bad, 0, f"{runs} runs"))
    return sorted(out, key=lambda t: _VERDICT_ORDER[t.verdict])


TARGET_COLUMNS = ("verdict", "target", "value", "limit", "from")


def target_rows(ts: Sequence[Target]) -> list[list[str]]:
    return [
        [
            t.verdict,
            t.what,
            "—" if math.isnan(t.value) else f"{t.value:,.3g}",
            "—" if math.isnan(t.limit) else f"≤ {t.limit:g}",
            t.note,
        ]
        for t in ts
    ]


# ---- the cases' table ----------------------------------------------------------------------

CASE_COLUMNS = (
    "case",
    "runs ok",
    "total s",
    "downtime ms",
    "guest gap ms",
    "round 0 MB/s",
    "rounds",
    "throttle %",
    "switch s",
    "guest before MB/s",
    "during MB/s",
    "during ÷ before",
    "in post-copy MB/s",
    "after MB/s",
    "longest stall ms",
    "page requests",
    "post-copy sent MB/s",
    "latency p50/p99/max ms",
    "blocktime ms",
    "bad pages",
)


def _spread(
    c: CaseResult, get: Callable[[Run], float], scale: float = 1.0, fmt: str = ",.0f"
) -> str:
    """median (min–max) over the good runs; "—" when none measured it."""
    vs = [v * scale for v in c.values(get)]
    if not vs:
        return "—"
    med = format(statistics.median(vs), fmt)
    if len(vs) == 1 or min(vs) == max(vs):
        return med
    return f"{med} ({format(min(vs), fmt)}–{format(max(vs), fmt)})"


def _rate(get: Callable[[PhaseRates], float]) -> Callable[[Run], float]:
    return lambda r: get(r.rates) if r.rates is not None else NAN


def _percentile(key: str) -> Callable[[Run], float]:
    return lambda r: r.latency_ms.get(key, NAN)


def _latency(c: CaseResult) -> str:
    parts = [_spread(c, _percentile(k), fmt=",.2f") for k in ("p50", "p99", "max")]
    return "—" if all(p == "—" for p in parts) else " / ".join(parts)


def case_row(c: CaseResult) -> list[str]:
    why = c.why_no_figures()
    if why:
        return [c.case.title, f"0/{len(c.runs)}", why, *["—"] * (len(CASE_COLUMNS) - 3)]
    pc = c.case.postcopy
    return [
        c.case.title,
        f"{len(c.good_runs())}/{len(c.runs)}",
        _spread(c, lambda r: r.total_ms, 1e-3, ",.1f"),
        _spread(c, lambda r: r.downtime_ms),
        _spread(c, _rate(lambda p: p.handover_s), 1e3),
        _spread(c, lambda r: r.round0_rate, 1 / MB),
        _spread(c, lambda r: float(r.rounds)),
        _spread(c, lambda r: float(r.throttle_pct)),
        _spread(c, lambda r: r.switch_ms, 1e-3, ",.1f") if pc else "—",
        _spread(c, _rate(lambda p: p.before), 1 / MB),
        _spread(c, _rate(lambda p: p.during), 1 / MB),
        _spread(c, _rate(lambda p: p.during_ratio), fmt=".2f"),
        _spread(c, _rate(lambda p: p.postcopy), 1 / MB) if pc else "—",
        _spread(c, _rate(lambda p: p.after), 1 / MB),
        _spread(c, _rate(lambda p: p.longest_stall_s), 1e3),
        _spread(c, lambda r: float(r.requests)) if pc else "—",
        _spread(c, lambda r: r.postcopy_rate, 1 / MB) if pc else "—",
        _latency(c) if pc else "—",
        _spread(c, lambda r: r.blocktime_ms, fmt=",.1f") if pc else "—",
        str(sum(r.rates.bad_pages for r in c.runs if r.rates is not None)),
    ]


def case_rows(cases: Sequence[CaseResult]) -> list[list[str]]:
    """One row per case; cases without figures (skipped, every run failed) first."""
    ordered = sorted(cases, key=lambda c: 0 if c.why_no_figures() else 1)
    return [case_row(c) for c in ordered]


def failures(cases: Sequence[CaseResult]) -> list[str]:
    """One line per run that did not count (or case that did not run), for the notes."""
    out = [f"{c.case.title}: skipped: {c.skipped}" for c in cases if c.skipped]
    for c in cases:
        for r in c.runs:
            if not r.good:
                pages = r.rates.bad_pages if r.rates is not None else 0
                why = r.error or (f"{pages} bad pages" if pages else "")
                out.append(f"{c.case.title}, run {r.repeat + 1}: {r.status}: {why}".rstrip(": "))
    return out


def markdown(tables: Sequence[tuple[str, Sequence[str], list[list[str]]]], notes: list[str]) -> str:
    text = "\n\n".join(f"{title}\n\n{markdown_table(cols, rows)}" for title, cols, rows in tables)
    if notes:
        text += "\n\nRuns that did not count:\n\n" + "\n".join(f"- {n}" for n in notes)
    return text + "\n"


__all__ = [
    "CASE_COLUMNS",
    "TARGET_COLUMNS",
    "CaseResult",
    "Run",
    "Target",
    "case_rows",
    "failures",
    "markdown",
    "target_rows",
    "targets",
]
