"""``vmferry bench postcopy``'s reading of the guest's PROGRESS lines: parsing, the rising
series, rates and stalls over windows (made-up samples: no VM, no clock)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from vmferry.bench import postcopy_progress as pp
from vmferry.bench.postcopy_plan import PAGE

S = pp.Sample


def test_a_progress_line_is_pages_and_bad_pages_and_nothing_else_is() -> None:
    assert pp.parse_line(b"PROGRESS 8192 0") == (8192, 0)
    assert pp.parse_line(b"PROGRESS 16384 3\r") == (16384, 3)
    for other in (b"churn: wss=1 pages=1", b"PROGRESS 12", b"PROGRESS x 0", b"BAD page=1 round=2"):
        assert pp.parse_line(other) is None


def test_the_series_rises_in_time_order_and_drops_repeats() -> None:
    # the destination's first line seen before the source's last one was read
    got = pp.rising(
        [S(2.0, 300, 0), S(1.0, 100, 0), S(1.5, 200, 0), S(1.6, 200, 0), S(2.1, 250, 0)]
    )
    assert [(s.t, s.pages) for s in got] == [(1.0, 100), (1.5, 200), (2.0, 300)]


def test_the_counter_is_interpolated_and_held_flat_past_the_last_line() -> None:
    s = [S(0.0, 0, 0), S(1.0, 1000, 0), S(2.0, 1000, 0), S(3.0, 4000, 0)]
    assert pp.pages_at(s, 0.5) == 500
    assert pp.pages_at(s, 2.5) == 2500
    assert pp.pages_at(s, 10.0) == 4000
    assert math.isnan(pp.pages_at([], 1.0))


def test_a_rate_is_bytes_per_second_over_its_window() -> None:
    s = [S(0.0, 0, 0), S(1.0, 1000, 0), S(2.0, 1000, 0), S(3.0, 4000, 0)]
    assert pp.rate(s, 0.0, 1.0) == pytest.approx(1000 * PAGE)
    assert pp.rate(s, 1.0, 2.0) == 0.0  # stood still
    assert pp.rate(s, 0.0, 3.0) == pytest.approx(4000 * PAGE / 3)
    assert pp.rate(s, 3.0, 5.0) == 0.0  # nothing printed after: no progress
    for t0, t1 in ((1.0, 1.0), (2.0, 1.0), (-1.0, 1.0)):  # empty, backwards, before any line
        assert math.isnan(pp.rate(s, t0, t1))
    assert math.isnan(pp.rate([], 0.0, 1.0))


def test_the_longest_stall_counts_the_window_edges() -> None:
    s = [S(1.0, 1, 0), S(1.1, 2, 0), S(2.6, 3, 0), S(2.7, 4, 0)]
    assert pp.longest_stall(s, 0.9, 3.0) == pytest.approx(1.5)
    assert pp.longest_stall(s, 2.65, 4.0) == pytest.approx(1.3)  # silent to the end
    assert pp.longest_stall([], 0.0, 2.0) == 2.0
    assert math.isnan(pp.longest_stall(s, 2.0, 2.0))


def test_phase_rates_before_during_after_and_the_bad_pages() -> None:
    s = [S(0.0, 0, 0), S(1.0, 2000, 0), S(2.0, 2500, 0), S(4.0, 2600, 1), S(5.0, 4600, 1)]
    r = pp.phase_rates(s, before=0.0, start=1.0, end=4.0, after=5.0)
    assert r.before == pytest.approx(2000 * PAGE)
    assert r.during == pytest.approx(600 * PAGE / 3)
    assert r.after == pytest.approx(2000 * PAGE)
    assert r.during_ratio == pytest.approx(0.1)
    assert r.longest_stall_s == pytest.approx(2.0)
    assert (r.bad_pages, r.lines) == (1, 5)
    idle = pp.phase_rates([S(0.0, 1, 0)], 0.0, 0.0, 1.0, 2.0)
    assert math.isnan(idle.during_ratio)


def test_the_tail_follows_the_source_then_the_destination(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.serial", tmp_path / "dst.serial"
    src.write_bytes(b"churn: wss=8192 pages=2 report=1 seed=7\nPROGRESS 1 0\nPROGRESS 2 0\nPROG")
    with pp.SerialTail([src, dst]) as tail:
        _until(lambda: tail.pages() == 2)
        with src.open("ab") as f:
            f.write(b"RESS 3 0\n")  # the line's second half
        dst.write_bytes(b"PROGRESS 4 0\nBAD page=1 round=2\nPROGRESS 5 1\n")
        _until(lambda: tail.pages() == 5)
        got = [(s.pages, s.bad, s.file) for s in pp.rising(tail.samples())]
    assert got == [(1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 1), (5, 1, 1)]
    assert tail.bad_lines == ["BAD page=1 round=2"]


def _until(cond: object, timeout: float = 10.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the tail did not see the lines"
        time.sleep(0.01)


def test_the_post_copy_phase_is_from_the_switch_to_the_end() -> None:
    s = [S(0.0, 0, 0), S(2.0, 2000, 0), S(3.0, 2100, 0), S(4.0, 2200, 0)]
    r = pp.phase_rates(s, 0.0, 1.0, 4.0, 5.0, switch=2.0)
    assert r.postcopy == pytest.approx(200 * PAGE / 2)
    assert math.isnan(pp.phase_rates(s, 0.0, 1.0, 4.0, 5.0).postcopy)


def test_the_handover_gap_is_the_sources_last_line_to_the_destinations_first() -> None:
    s = [S(1.0, 1, 0, 0), S(1.2, 2, 0, 0), S(1.45, 3, 0, 1), S(1.5, 4, 0, 1)]
    assert pp.handover_gap(s) == pytest.approx(0.25)
    assert pp.phase_rates(s, 0.9, 1.0, 1.5, 2.0).handover_s == pytest.approx(0.25)
    assert math.isnan(pp.handover_gap(s[:2]))
