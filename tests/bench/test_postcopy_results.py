"""``vmferry bench postcopy``'s targets as ratios of made-up runs, and its tables (misses
first, skipped cases said so): pure functions, no VM."""

from __future__ import annotations

import json
import math

import pytest

from vmferry.bench import postcopy_results as pr
from vmferry.bench.postcopy_plan import CASES, GIB, MB
from vmferry.bench.postcopy_progress import PhaseRates

KEYS = [c.key for c in CASES]


def _run(
    case: str, total_s: float, downtime_ms: float, rate_mb: float = 150.0, **kw: object
) -> pr.Run:
    r = pr.Run(
        case,
        0,
        "completed",
        memory=2 * GIB,
        total_ms=total_s * 1e3,
        downtime_ms=downtime_ms,
        round0_rate=rate_mb * MB,
        rates=PhaseRates(3e9, 1e9, 2.5e9, 0.4, 0, 100),
    )
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def _cases(**runs: list[pr.Run]) -> dict[str, pr.CaseResult]:
    return {k: pr.CaseResult(k, runs.get(k.replace("-", "_"), [])) for k in KEYS}


def _by_what(ts: list[pr.Target]) -> dict[str, pr.Target]:
    return {t.what: t for t in ts}


def test_once_ratio_is_total_over_ram_at_round_zeros_rate() -> None:
    # 2 GiB at 150 MB/s: 14.3 s once; 21.5 s in all is 1.5 of that
    r = _run("vmferry-postcopy", 2 * GIB / 150e6 * 1.5, 10)
    assert r.once_ratio == pytest.approx(1.5)
    assert math.isnan(_run("vmferry-postcopy", 10, 10, rate_mb=math.nan).once_ratio)


def test_a_run_counts_only_completed_without_error_or_bad_pages() -> None:
    assert _run("qemu-precopy", 10, 10).good
    assert not _run("qemu-precopy", 10, 10, status="cancelled").good
    assert not _run("qemu-precopy", 10, 10, error="not converged within 150 s").good
    assert not _run("qemu-precopy", 10, 10, rates=PhaseRates(1, 1, 1, 0, 2, 9)).good


def test_the_targets_are_ratios_of_medians_misses_first() -> None:
    once = 2 * GIB / 150e6
    cases = _cases(
        vmferry_postcopy=[
            _run(
                "vmferry-postcopy", once * 1.4, 40, latency_ms={"p50": 1.0, "p99": 7.0, "max": 9.0}
            ),
            _run(
                "vmferry-postcopy", once * 1.6, 60, latency_ms={"p50": 1.0, "p99": 9.0, "max": 9.0}
            ),
        ],
        vmferry_precopy=[_run("vmferry-precopy", 60, 100)],
        qemu_postcopy=[_run("qemu-postcopy", once * 1.5 * 2, 5)],
        qemu_precopy=[_run("qemu-precopy", 70, 50)],
    )
    ts = pr.targets(cases)
    t = _by_what(ts)
    assert t["vmferry post-copy total ÷ (RAM ÷ round-0 rate)"].value == pytest.approx(1.5)
    assert t["vmferry post-copy total ÷ (RAM ÷ round-0 rate)"].verdict == "met"
    assert t["vmferry post-copy total ÷ QEMU post-copy total"].value == pytest.approx(0.5)
    assert t["vmferry post-copy downtime ÷ pre-copy downtime"].value == pytest.approx(0.5)
    assert t["QEMU post-copy downtime ÷ pre-copy downtime"].verdict == "info"
    assert t["vmferry page-request latency p99 (ms)"].value == pytest.approx(8.0)
    assert t["vmferry page-request latency p99 (ms)"].verdict == "MISS"
    assert t["pages the guest found wrong, all runs"].verdict == "met"
    verdicts = [x.verdict for x in ts]
    assert verdicts == sorted(verdicts, key=lambda v: ["MISS", "n/a", "met", "info"].index(v))
    assert verdicts[0] == "MISS"


def test_a_skipped_or_failed_case_makes_its_targets_na_with_the_reason() -> None:
    cases = _cases(
        vmferry_precopy=[_run("vmferry-precopy", 60, 100)],
        qemu_postcopy=[_run("qemu-postcopy", 20, 5, status="failed", error="boom")],
        qemu_precopy=[_run("qemu-precopy", 70, 50)],
    )
    cases["vmferry-postcopy"].skipped = "vmferry refused migrate-start-postcopy: not supported"
    t = _by_what(pr.targets(cases))
    vs = t["vmferry post-copy total ÷ QEMU post-copy total"]
    assert vs.verdict == "n/a" and "refused migrate-start-postcopy" in vs.note
    assert "qemu-postcopy: boom" in t["QEMU post-copy downtime ÷ pre-copy downtime"].note
    rows = pr.case_rows(list(cases.values()))
    # the cases without figures come first, their reason where the total would be
    assert [r[0] for r in rows[:2]] == ["vmferry pre-copy then post-copy", "QEMU 7.2 postcopy-ram"]
    assert rows[0][2].startswith("skipped: vmferry refused") and rows[1][2] == "boom"
    notes = pr.failures(list(cases.values()))
    assert any("skipped" in n for n in notes) and any("failed: boom" in n for n in notes)


def test_bad_pages_anywhere_are_a_miss() -> None:
    bad = _run("qemu-precopy", 70, 50, rates=PhaseRates(1, 1, 1, 0, 3, 9))
    t = _by_what(pr.targets(_cases(qemu_precopy=[bad])))
    assert t["pages the guest found wrong, all runs"].value == 3
    assert t["pages the guest found wrong, all runs"].verdict == "MISS"


def test_the_case_row_gives_median_and_range_and_dashes_for_pre_copy() -> None:
    c = pr.CaseResult(
        "vmferry-precopy", [_run("vmferry-precopy", 60, 100), _run("vmferry-precopy", 62, 300)]
    )
    row = dict(zip(pr.CASE_COLUMNS, pr.case_row(c), strict=True))
    assert row["runs ok"] == "2/2"
    assert row["total s"] == "61.0 (60.0–62.0)"
    assert row["downtime ms"] == "200 (100–300)"
    assert row["during ÷ before"] == "0.33"
    assert row["switch s"] == row["latency p50/p99/max ms"] == "—"


def test_markdown_and_json_have_no_nan() -> None:
    r = _run("vmferry-postcopy", 20, 50)
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["blocktime_ms"] is None and d["good"] is True
    text = pr.markdown([("T", pr.TARGET_COLUMNS, pr.target_rows(pr.targets(_cases())))], ["x: y"])
    assert text.startswith("T\n\n| verdict |") and "- x: y" in text


def test_post_copys_send_rate_is_its_bytes_over_the_time_after_the_switch() -> None:
    r = _run("qemu-postcopy", 12.0, 5, switch_ms=8000.0, postcopy_bytes=600_000_000)
    assert r.postcopy_rate == pytest.approx(150e6)
    assert math.isnan(_run("qemu-precopy", 60, 50).postcopy_rate)


def test_vmferrys_post_copy_figures_come_from_the_report_and_the_destination() -> None:
    from vmferry.bench.postcopy_vmferry import postcopy_figures

    src = {
        "ram": {"postcopy-requests": 12, "postcopy-bytes": 4096},
        "x-bench-postcopy": {
            "active": True,
            "switch_s": 1.5,
            "blocktime_ms": 9.0,
            "latency_ms": {"p50": 0.3, "p99": 4.0, "max": 8.0},
        },
    }
    got = postcopy_figures(src, {"postcopy-blocktime": 11})
    assert got["requests"] == 12 and got["bytes"] == 4096 and got["switch_ms"] == 1500
    assert got["blocktime_ms"] == 11  # the destination measures the waits
    assert got["latency_ms"] == {"p50": 0.3, "p99": 4.0, "max": 8.0}
    assert postcopy_figures(src, {})["blocktime_ms"] == 9.0
    # a pre-copy run: PostcopyFigures' zeros are not figures
    pre = postcopy_figures({"x-bench-postcopy": {"active": False, "switch_s": 0.0}}, {})
    assert math.isnan(pre["switch_ms"]) and math.isnan(pre["blocktime_ms"])
    assert pre["latency_ms"] == {}
