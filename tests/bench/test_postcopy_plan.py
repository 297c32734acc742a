"""``vmferry bench postcopy``: its plan, case order and options (no VM)."""

from __future__ import annotations

import pytest

from tests.conftest import vmferry
from vmferry.bench import fill as bench_fill
from vmferry.bench import postcopy as bp
from vmferry.bench import postcopy_plan as plan_mod
from vmferry.cli.main import build_parser
from vmferry.errors import ConfigError

GIB = 1 << 30


def test_the_full_plan_is_a_2_gib_guest_with_1_gib_rewritten_twice_per_case() -> None:
    p = plan_mod.make_plan()
    assert (p.memory, p.wss, p.repeats) == (2 * GIB, GIB, 2)
    assert p.cap == 150_000_000 and p.downtime_limit_ms == 300 and p.channels == 2
    assert p.cmdline == "wss=1024M report=8192 seed=7"
    assert p.wss_pages == GIB // 4096
    assert p.once_s == pytest.approx(2 * GIB / 150e6)
    assert p.cases == ("vmferry-precopy", "vmferry-postcopy", "qemu-precopy", "qemu-postcopy")


def test_quick_is_smaller_and_once_and_repeats_override() -> None:
    q = plan_mod.make_plan(quick=True)
    assert (q.memory, q.wss, q.repeats) == (GIB, 512 << 20, 1)
    assert plan_mod.make_plan(quick=True, repeats=3).repeats == 3
    for bad in (0, 11):
        with pytest.raises(ConfigError, match="--repeats"):
            plan_mod.make_plan(repeats=bad)


def test_the_cases_run_in_abba_order() -> None:
    assert plan_mod.order(("a", "b"), 3) == [
        ("a", 0),
        ("b", 0),
        ("b", 1),
        ("a", 1),
        ("a", 2),
        ("b", 2),
    ]


def test_cases_are_chosen_by_name_in_the_plans_order() -> None:
    assert bp.parse_cases("qemu-postcopy, vmferry-precopy") == ("vmferry-precopy", "qemu-postcopy")
    with pytest.raises(ConfigError, match="unknown nope"):
        bp.parse_cases("nope,qemu-postcopy")
    with pytest.raises(ConfigError, match="none given"):
        bp.parse_cases(" , ")


def test_the_options_parse() -> None:
    a = build_parser().parse_args(
        ["bench", "postcopy", "--quick", "--repeats", "3", "--json", "x.json", "--markdown", "x.md"]
    )
    assert a.quick and a.repeats == 3 and a.json == "x.json" and a.markdown == "x.md"
    assert a.func is bp.cmd_bench_postcopy


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["--repeats", "0"], "--repeats 0"), (["--cases", "bogus"], "--cases 'bogus'")],
)
def test_bad_options_are_one_line_and_125(argv: list[str], words: str) -> None:
    p = vmferry("bench", "postcopy", *argv)
    assert p.returncode == 125
    assert words in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_case_that_does_not_fit_is_skipped_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench_fill, "available_memory", lambda: 3 * GIB)
    why = bp.why_skipped("vmferry-precopy", plan_mod.make_plan())
    assert why == "needs 2 × 2 GiB + 2 GiB free, 3.0 GiB available"
