"""``vmferry bench migrate``: its options, its plan, the targets as pure functions and the
tables, from made-up runs (no VM, no clock: benchmarks are not tests)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from tests.conftest import vmferry
from vmferry.bench import fill
from vmferry.bench import migrate as bm
from vmferry.bench import migrate_results as mr
from vmferry.bench.qemu import round0_rate
from vmferry.cli import bench as cli_bench
from vmferry.cli.main import build_parser
from vmferry.errors import ConfigError

GIB = 1 << 30


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "migrate", *argv])


# ---- options and plan -------------------------------------------------------------------


def test_the_full_plan_is_1_4_8_gib_all_workloads_twice() -> None:
    plan = cli_bench.migrate_plan(_args())
    assert plan.sizes == (1, 4, 8) and plan.repeats == 2 and plan.throughput
    assert plan.channels == 2 and plan.downtime_limit_ms == 300
    labels = [c.label for c in plan.cases]
    # a 1 GiB working set does not fit in a 1 GiB guest (it is laid from 16 MiB up)
    assert labels == [
        "1 GiB, idle",
        "1 GiB, wss256",
        "4 GiB, idle",
        "4 GiB, wss256",
        "4 GiB, wss1g-512",
        "8 GiB, idle",
        "8 GiB, wss256",
        "8 GiB, wss1g-512",
    ]
    # a running guest outlasts the timeout at its fastest (3 s head start), the same
    # parameters for both VMMs; the idle one only has to print RESULT after
    cmd = {c.label: plan.cmdline(c) for c in plan.cases}
    assert cmd["1 GiB, wss256"] == "wss=256M rounds=392 seed=5"  # (19.5 + 3 + 1) / 0.06
    assert cmd["8 GiB, wss256"] == "wss=256M rounds=917 seed=5"
    assert cmd["4 GiB, wss1g-512"] == "wss=1G rate=512 rounds=19 seed=7"
    assert cmd["1 GiB, idle"] == cmd["8 GiB, idle"] == "wss=1M rate=1 rounds=3 seed=3"


def test_quick_is_1_gib_once_and_options_override() -> None:
    quick = cli_bench.migrate_plan(_args("--quick"))
    assert quick.sizes == (1,) and quick.repeats == 1 and quick.ram_repeat == 1
    plan = cli_bench.migrate_plan(
        _args("--sizes", "8,1", "--workloads", "wss256", "--repeats", "3", "--skip-throughput")
    )
    assert plan.sizes == (1, 8) and plan.workloads == ("wss256",)
    assert plan.repeats == 3 and not plan.throughput
    assert [c.label for c in plan.cases] == ["1 GiB, wss256", "8 GiB, wss256"]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--sizes", "1,x", "want GiB counts"),
        ("--sizes", "0", "1 to 64 GiB"),
        ("--workloads", "idle,busy", "unknown busy"),
        ("--repeats", "0", "must be 1 to 20"),
    ],
)
def test_bad_options_are_one_line_and_125(option: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        cli_bench.migrate_plan(_args(option, value))
    p = vmferry("bench", "migrate", option, value, timeout=60)
    assert p.returncode == 125
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr


def test_abba_order() -> None:
    assert bm.abba(1) == ["qemu", "vmferry"]
    assert bm.abba(2) == ["qemu", "vmferry", "vmferry", "qemu"]
    assert bm.abba(3)[4:] == ["qemu", "vmferry"]


def test_timeout_grows_with_the_guest() -> None:
    plan = bm.make_plan()
    assert plan.timeout_s(GIB) < plan.timeout_s(8 * GIB) == 51.0


# ---- the fill and the room for it ------------------------------------------------------------


def test_fill_is_deterministic_incompressible_and_starts_at_32_mib() -> None:
    a = np.zeros((200 << 20) // 8, dtype=np.uint64)
    b = np.zeros_like(a)
    fill.fill_words(a)
    fill.fill_words(b)
    assert np.array_equal(a, b)
    start = fill.FILL_START // 8
    assert not a[:start].any()
    pages = a[start:].reshape(-1, 512)
    assert np.unique(pages[:, 0]).size == pages.shape[0]  # no two pages alike
    assert (pages != 0).all(axis=1).all()


def test_two_guests_must_fit_with_a_margin() -> None:
    assert fill.fits(8 * GIB, 19 * GIB)
    assert not fill.fits(8 * GIB, 17 * GIB)
    assert fill.fits(GIB, 4 * GIB) and not fill.fits(GIB, 3 * GIB + 1 - GIB)


# ---- QEMU's round 0 rate from polls -----------------------------------------------------------


def _poll(status: str, syncs: int, transferred: int, total: float) -> dict[str, object]:
    ram = {"dirty-sync-count": syncs, "transferred": transferred}
    return {"status": status, "total-time": total, "setup-time": 10, "ram": ram}


def test_qemu_round0_rate_is_the_last_poll_before_the_second_sync() -> None:
    polls = [
        _poll("setup", 0, 0, 5),
        _poll("active", 1, 100_000_000, 110),
        _poll("active", 1, 300_000_000, 310),
        _poll("active", 2, 500_000_000, 510),
        _poll("completed", 3, 600_000_000, 700),
    ]
    assert round0_rate(polls) == pytest.approx(300e6 / 0.3)
    assert round0_rate(polls[3:]) == -1.0  # no poll fell in round 0
    assert round0_rate([]) == -1.0


# ---- targets and tables -------------------------------------------------------------------


def _run(vmm: str, total: float, down: float, **kw: object) -> mr.VmmRun:
    return mr.VmmRun(vmm, "completed", total, down, result_ok=True, **kw)  # type: ignore[arg-type]


def _case(memory: int, workload: str, runs: list[mr.VmmRun]) -> mr.CaseResult:
    return mr.CaseResult(memory, workload, workload, "wss=256M", "abc", 300, runs)


PHASES = {
    "phases": {
        "pre-resume": {"pages": 1200, "ms": 4.0, "status": "passed"},
        "audit": {"pages": 262144, "ms": 180.0, "source_ms": 90.0, "status": "passed"},
    }
}


def test_medians_ranges_and_ratios() -> None:
    c = _case(
        GIB,
        "wss256",
        [
            _run("qemu", 2000, 80, round0_rate=500e6, setup_ms=2),
            _run("vmferry", 700, 60, round0_rate=2e9, setup_ms=12, verify=PHASES),
            _run("vmferry", 900, 100, round0_rate=1e9, setup_ms=14, verify=PHASES),
            _run("qemu", 1600, 120, round0_rate=600e6, setup_ms=3),
        ],
    )
    assert c.spread("vmferry", lambda r: r.total_ms) == mr.Spread(800, 700, 900, 2)
    assert c.total_ratio == pytest.approx(800 / 1800)
    assert c.downtime_ratio == pytest.approx(80 / 100)
    assert c.within_limit is True
    row = dict(zip(mr.CASE_COLUMNS, mr.case_row(c), strict=True))
    assert row["vmferry total ms"] == "800 (700–900)"
    assert row["QEMU total ms"] == "1,800 (1,600–2,000)"
    assert row["total ratio"] == "0.44" and row["≤ 0.5?"] == "yes"
    assert row["downtime ratio"] == "0.80" and row["≤ 1?"] == "yes"
    assert row["within limit?"] == "yes (max 100)"
    assert row["verify pre-resume"] == "1,200 p / 4 ms"
    assert row["verify audit"] == "262,144 p / 180 ms"
    assert row["setup ms (vmferry / QEMU)"] == "13 / 2"
    assert row["round 0 MB/s (vmferry / QEMU)"] == "1,500 / 550"
    assert row["good runs (vmferry / QEMU)"] == "2/2 / 2/2"


def test_a_bad_run_is_left_out_of_the_figures_and_listed() -> None:
    bad = mr.VmmRun("vmferry", "completed", 100, 50, result_ok=False, error="RESULT x != y")
    c = _case(
        GIB,
        "idle",
        [_run("qemu", 1000, 300), bad, _run("vmferry", 600, 400), _run("qemu", 1000, 300)],
    )
    assert c.spread("vmferry", lambda r: r.total_ms).median == 600
    assert c.within_limit is False  # 400 ms > 300
    row = dict(zip(mr.CASE_COLUMNS, mr.case_row(c), strict=True))
    assert row["within limit?"] == "NO (max 400)"
    assert row["≤ 1?"] == "NO"
    assert row["verify pre-resume"] == "-"  # no phases until two-phase verification
    assert row["good runs (vmferry / QEMU)"] == "1/2 / 2/2"
    assert mr.errors([c]) == ["1 GiB, idle: vmferry run 1: RESULT x != y"]


def test_no_qemu_run_means_no_ratio_and_no_verdict() -> None:
    c = _case(GIB, "idle", [_run("vmferry", 600, 100), mr.VmmRun("qemu", "error", -1, -1)])
    assert math.isnan(c.total_ratio)
    row = dict(zip(mr.CASE_COLUMNS, mr.case_row(c), strict=True))
    assert row["total ratio"] == "-" and row["≤ 0.5?"] == "-"


def test_a_skipped_case_says_why() -> None:
    c = _case(8 * GIB, "idle", [])
    c.skipped = "needs 2 × 8 GiB + 2 GiB free, 12.0 GiB available"
    row = mr.case_row(c)
    assert len(row) == len(mr.CASE_COLUMNS)
    assert row[-1].startswith("skipped: needs 2 × 8 GiB")


def test_independence_is_largest_over_smallest_per_workload() -> None:
    cases = [
        _case(GIB, "wss256", [_run("vmferry", 1, 100), _run("vmferry", 1, 120)]),
        _case(4 * GIB, "wss256", [_run("vmferry", 1, 200)]),
        _case(8 * GIB, "wss256", [_run("vmferry", 1, 121)]),
        _case(4 * GIB, "wss1g-512", [_run("vmferry", 1, 90)]),
        _case(8 * GIB, "wss1g-512", [_run("vmferry", 1, 180)]),
        _case(GIB, "idle", [_run("vmferry", 1, 50)]),  # one size only: no ratio
    ]
    ind = mr.independence(cases)
    assert [(i.workload, i.label) for i in ind] == [
        ("wss256", "8 GiB ÷ 1 GiB"),
        ("wss1g-512", "8 GiB ÷ 4 GiB"),
    ]
    assert ind[0].ratio == pytest.approx(121 / 110)
    rows = mr.independence_rows(ind)
    assert rows[0][-1] == "yes" and rows[1][-2:] == ["2.00", "NO"]


@pytest.mark.parametrize(
    ("value", "target", "at_most", "want"),
    [
        (0.5, 0.5, True, True),
        (0.51, 0.5, True, False),
        (0.9, 0.9, False, True),
        (0.89, 0.9, False, False),
        (math.nan, 0.5, True, None),
    ],
)
def test_meets(value: float, target: float, at_most: bool, want: bool | None) -> None:
    assert mr.meets(value, target, at_most=at_most) is want


def test_within_limit() -> None:
    assert mr.within_limit([], 300) is None
    assert mr.within_limit([300.0, 12.0], 300) is True
    assert mr.within_limit([300.5], 300) is False


def test_throughput_rows_and_markdown() -> None:
    t = mr.ThroughputResult(2, 1 << 30, 3e9, [2.8e9, 3.2e9], 1e9, 6e9, [6e9], 4e9)
    row = mr.throughput_rows([t])[0]
    assert row == ["2", "3,000 (2,800–3,200)", "1,000", "6,000", "4,000", "0.50", "NO"]
    results = bm.MigrateResults(1e9, [t], [_case(GIB, "idle", [_run("vmferry", 600, 100)])])
    tables = cli_bench.migrate_tables(results, bm.make_plan(quick=True))
    text = cli_bench.migrate_markdown(tables, ["1 GiB, idle: qemu run 1: error"])
    assert text.count("\n|---|") == 3  # round 0, cases, breakdown (no second size)
    assert "| 1 GiB, idle | - | - | - | - | - | - | 0 / - |" in text
    assert "target ≥ 0.9" in text and "- 1 GiB, idle: qemu run 1: error" in text
    doc = results.to_dict()
    assert json.loads(json.dumps(doc))["vs_qemu"][0]["within_limit"] is True
