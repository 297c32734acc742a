"""The downtime window as the policy weighs it: the bytes at the measured bandwidth, the
pre-resume check's digests and the fixed costs, all in the expected downtime; what
iterating cannot shrink comes out of the limit. Table tests, no VM."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.migration.params import MigrationParameters
from vmferry.migration.policy import (
    NO_VERIFY,
    PAGE_SIZE,
    VerifyCost,
    decide,
    verify_cost,
    window,
)

MIB = 1 << 20
P = MigrationParameters()  # downtime-limit 300 ms
BW = 1000 * MIB  # 1 MiB per ms
GIB_PAGES = (1 << 30) // PAGE_SIZE
HALF_US = 0.0005  # ms per page
# 4 µs a page: digesting a page costs as much as sending it at BW, so the final round
# goes at half the bandwidth.
AS_SLOW_AS_SENDING = PAGE_SIZE / BW * 1e3

# pending RAM, device state, overhead ms, verify cost → action, expected downtime ms
CASES = [
    pytest.param(100 * MIB, 0, 20.0, NO_VERIFY, "switchover", 120.0, id="bytes+fixed"),
    pytest.param(100 * MIB, 10 * MIB, 20.0, NO_VERIFY, "switchover", 130.0, id="device state"),
    pytest.param(290 * MIB, 0, 20.0, NO_VERIFY, "continue", 310.0, id="fixed cost pushes out"),
    # strict: every resident page (1 GiB) is digested whatever is pending: 131 ms fixed
    pytest.param(
        100 * MIB,
        0,
        10.0,
        VerifyCost(GIB_PAGES, False, HALF_US),
        "switchover",
        241.072,
        id="strict, fits",
    ),
    pytest.param(
        200 * MIB,
        0,
        10.0,
        VerifyCost(GIB_PAGES, False, HALF_US),
        "continue",
        341.072,
        id="strict, RAM left is too much with the check",
    ),
    # fixed costs over half the limit take only half: RAM still gets 150 ms, and the
    # expected downtime says honestly that the limit will not hold
    pytest.param(
        100 * MIB,
        0,
        10.0,
        VerifyCost(800_000, False, HALF_US),
        "switchover",
        510.0,
        id="strict, check alone over half the limit",
    ),
    # on: the final round's pages are digested too, so they cost twice their send
    pytest.param(
        100 * MIB,
        0,
        10.0,
        VerifyCost(0, True, AS_SLOW_AS_SENDING),
        "switchover",
        210.0,
        id="on, final round digested",
    ),
    pytest.param(
        150 * MIB,
        0,
        10.0,
        VerifyCost(0, True, AS_SLOW_AS_SENDING),
        "continue",
        310.0,
        id="on, final round too large to digest in time",
    ),
    # on with pages a device can reach (checked whatever is pending): 8 MiB of them
    pytest.param(
        100 * MIB,
        0,
        10.0,
        VerifyCost(2048, True, AS_SLOW_AS_SENDING),
        "switchover",
        218.0,
        id="on, DMA-reachable pages",
    ),
    pytest.param(
        0,
        0,
        10.0,
        VerifyCost(GIB_PAGES, True, HALF_US),
        "switchover",
        141.072,
        id="nothing pending still pays the check",
    ),
]


@pytest.mark.parametrize(("pending", "device", "overhead", "verify", "action", "expected"), CASES)
def test_window_table(
    pending: int,
    device: int,
    overhead: float,
    verify: VerifyCost,
    action: str,
    expected: float,
) -> None:
    d = decide(1000, pending, BW, 0.0, P, device, overhead_ms=overhead, verify=verify)
    assert d.action == action, d.reason
    assert d.expected_downtime_ms == pytest.approx(expected, abs=0.01)
    assert d.overhead_ms == overhead and d.verify == verify


def test_the_reason_names_the_parts_of_the_window() -> None:
    d = decide(
        1000, 100 * MIB, BW, 0.0, P, overhead_ms=10.0, verify=VerifyCost(GIB_PAGES, False, HALF_US)
    )
    assert d.reason.startswith("converged: pending 100 MiB ≤ threshold 159 MiB")
    assert d.reason.endswith("expected downtime 241 ms (RAM and state 100, verify 131, fixed 10)")
    on = decide(
        1000,
        100 * MIB,
        BW,
        0.0,
        P,
        overhead_ms=10.0,
        verify=VerifyCost(0, True, AS_SLOW_AS_SENDING),
    )
    # the threshold is at the rate pages are sent *and* digested
    assert "stop-copy bandwidth 500 MiB/s × 290 ms of 300" in on.reason
    assert "verify 100" in on.reason


def test_the_live_figure_uses_the_decisions_costs() -> None:
    """query-migrate's expected-downtime while a round is sent: the same window at the
    remainder and rate of the moment."""
    verify = VerifyCost(GIB_PAGES, True, HALF_US)
    d = decide(1000, 100 * MIB, BW, 0.0, P, 3 * MIB, overhead_ms=12.0, verify=verify)
    assert d.expected_at(100 * MIB, 3 * MIB, BW) == pytest.approx(d.expected_downtime_ms)
    w = window(10 * MIB, 3 * MIB, 2 * BW, 12.0, verify)
    assert d.expected_at(10 * MIB, 3 * MIB, 2 * BW) == pytest.approx(w.total_ms)
    assert w.fixed_ms == 12.0 and w.state_ms == pytest.approx(6.5)
    assert w.verify_ms == pytest.approx((GIB_PAGES + 10 * MIB // PAGE_SIZE) * HALF_US)


def test_the_checks_setup_is_in_the_fixed_part() -> None:
    """Finding what to check is paid whatever is pending: it comes out of the limit and
    into the expected downtime."""
    cost = VerifyCost(0, True, AS_SLOW_AS_SENDING, setup_ms=40.0)
    assert cost.fixed_ms == 40.0
    d = decide(1000, 100 * MIB, BW, 0.0, P, overhead_ms=10.0, verify=cost)
    assert d.action == "switchover" and d.expected_downtime_ms == pytest.approx(250.0)
    assert "stop-copy bandwidth 500 MiB/s × 250 ms of 300" in d.reason
    assert decide(1000, 130 * MIB, BW, 0.0, P, overhead_ms=10.0, verify=cost).action == "continue"


def test_verify_cost_parts() -> None:
    assert NO_VERIFY.fixed_ms == 0.0 and NO_VERIFY.pending_ms(100 * MIB) == 0.0
    assert NO_VERIFY.bandwidth(BW) == BW
    v = VerifyCost(10, True, 0.5)
    assert v.fixed_ms == 5.0
    assert v.pending_ms(PAGE_SIZE + 1) == 1.0  # a partial page is a page
    assert v.pending_ms(0) == 0.0
    assert VerifyCost(10, False, 0.5).pending_ms(MIB) == 0.0
    assert VerifyCost(0, True, AS_SLOW_AS_SENDING).bandwidth(BW) == pytest.approx(BW / 2)
    assert v.bandwidth(0.0) == 0.0


@given(
    pending=st.integers(0, 2 << 30),
    device=st.integers(0, 64 << 20),
    bw=st.floats(1e6, 1e10),
    overhead=st.floats(0, 150),
    pages=st.integers(0, 1 << 21),
    per_pending=st.booleans(),
    ms_per_page=st.floats(0, 0.01),
    limit=st.integers(50, 2000),
)
def test_a_converged_switchover_expects_to_hold_the_limit(
    pending: int,
    device: int,
    bw: float,
    overhead: float,
    pages: int,
    per_pending: bool,
    ms_per_page: float,
    limit: int,
) -> None:
    """Whenever the fixed part leaves RAM at least half the limit, a switchover the
    policy calls converged expects to stay within the limit."""
    verify = VerifyCost(pages, per_pending, ms_per_page)
    params = MigrationParameters(downtime_limit_ms=limit)
    d = decide(0, pending, bw, 0.0, params, device, overhead_ms=overhead, verify=verify)
    if d.action == "switchover" and overhead + verify.fixed_ms <= limit / 2:
        assert d.expected_downtime_ms <= limit * (1 + 1e-9) + 1e-6, d.reason


# mode, resident, mapped, reachable (resident of mapped) → pages, pending, setup ms
# (digest 0.001 ms a page, resident scan 30 ms, on's set 5 ms)
COST_CASES = [
    pytest.param("off", 1000, 500, 400, 0, False, 0.0, id="off: nothing"),
    pytest.param("strict", 1000, 0, 0, 1000, False, 30.0, id="strict: all resident, scanned"),
    pytest.param("strict", 1000, 500, 400, 1000, False, 30.0, id="strict with a device"),
    # since ce8df36 the switchover finds resident pages only where a device maps some
    pytest.param("on", 1000, 0, 0, 0, True, 0.0, id="on, no device: no scan"),
    pytest.param("on", 1000, 500, 400, 400, True, 35.0, id="on, a device: scan and set"),
    pytest.param("on", 1000, 500, 0, 0, True, 35.0, id="on, device maps only holes"),
]


@pytest.mark.parametrize(
    ("mode", "resident", "mapped", "reachable", "pages", "pending", "setup"), COST_CASES
)
def test_the_check_costs_what_the_switchover_will_do(
    mode: str,
    resident: int,
    mapped: int,
    reachable: int,
    pages: int,
    pending: bool,
    setup: float,
) -> None:
    cost = verify_cost(mode, resident, mapped, reachable, 0.001, scan_ms=30.0, set_ms=5.0)
    if mode == "off":
        assert cost == NO_VERIFY
        return
    assert (cost.pages, cost.pending) == (pages, pending)
    assert cost.setup_ms == pytest.approx(setup)
    assert cost.ms_per_page == 0.001
    assert cost.fixed_ms == pytest.approx(pages * 0.001 + setup)


def test_the_check_follows_the_counts_of_each_decision() -> None:
    """Recounted at each decision: more resident RAM, a bigger strict check."""
    small = verify_cost("strict", 1000, 0, 0, 0.001, scan_ms=30.0)
    grown = verify_cost("strict", 5000, 0, 0, 0.001, scan_ms=30.0)
    assert grown.fixed_ms - small.fixed_ms == pytest.approx(4000 * 0.001)
