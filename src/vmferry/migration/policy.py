"""When to stop iterating: pure functions of measured metrics (no I/O, no clocks).

The rules are QEMU's (``migration/migration.c``, ``migration/ram.c``): switch over once
what is still pending fits in bandwidth × downtime-limit; with auto-converge, throttle the
guest's vCPUs when it dirties memory faster than half of what is sent. Like Cloud
Hypervisor's ``is_precopy_converged`` they take numbers and return a decision, so every
case is tested without a VM. Units: bytes, bytes/s, milliseconds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

from vmferry.errors import ConfigError
from vmferry.migration.params import MigrationParameters
from vmferry.migration.policy_window import (
    NO_VERIFY,
    PAGE_SIZE,
    VerifyCost,
    Window,
    expected_downtime_ms,
    verify_cost,
    window,
)

Action = Literal["continue", "switchover", "cancel"]

MIB: Final = 1 << 20
# QEMU counts a strike when the guest dirtied more than 50 % of what was sent in a period
# (its throttle-trigger-threshold default), and throttles on the second strike.
THROTTLE_TRIGGER_PCT: Final = 50
STRIKES_TO_THROTTLE: Final = 2
# QEMU's rate limiter budgets max-bandwidth in 100 ms windows.
RATE_WINDOW_S: Final = 0.1
MIN_BATCH_PAGES: Final = 64  # 256 KiB: smaller sections cost more in headers than they pace
# The switchover's fixed cost besides the last dirty sync (measured by each migration):
# kicking the vCPUs out, capturing their state, the destination's resume and its
# confirmation, 2-10 ms together in this host's bench runs (1 vCPU). Taken at the top.
PAUSE_RESUME_MS: Final = 10.0


def size(nbytes: float) -> str:
    """``812 MiB``, ``1.5 GiB``, ``300 KiB``: short enough for a reason line."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            value = nbytes / scale
            return (
                f"{value:.1f} {unit}"
                if value < 10 and value != int(value)
                else f"{value:.0f} {unit}"
            )
    return f"{nbytes:.0f} B"


def rate(bps: float) -> str:
    return f"{size(bps)}/s"


def switchover_threshold(bandwidth_bps: float, downtime_limit_ms: float) -> int:
    """Bytes that can be sent within the downtime limit at the measured bandwidth."""
    return int(max(bandwidth_bps, 0.0) * max(downtime_limit_ms, 0.0) / 1000)


def switchover_bandwidth(round_bandwidths: Sequence[float], ram_pending: int) -> float:
    """The bandwidth the stop-and-copy can count on, measured by the pre-copy rounds so
    far (round 0 first): that of the dirty-page rounds that sent something, the lower of
    the last two (one fast round is not a trend).

    Round 0 copies RAM in long runs; the stop-and-copy sends scattered dirty pages, which
    went ~6.5x slower in a measured case (1.9 GiB/s against 290 MB/s). So with RAM
    pending and no dirty-page round measured, the rate is unknown (0: a round of dirty
    pages goes first and measures it). With no RAM pending, what is left is state sent in
    bulk, as round 0 sent RAM: round 0's rate."""
    measured = [b for b in round_bandwidths[1:] if b > 0]
    if measured:
        return min(measured[-2:])
    if ram_pending <= 0 and round_bandwidths:
        return max(round_bandwidths[0], 0.0)
    return 0.0


def ram_budget_ms(limit_ms: float, overhead_ms: float) -> float:
    """The part of the downtime limit left for RAM and device state. Fixed costs do not
    shrink by iterating, so they take at most half the limit: holding out for a remainder
    of almost nothing would only prolong the migration."""
    return max(limit_ms - max(overhead_ms, 0.0), limit_ms / 2)


def batch_pages(max_bandwidth: int, default: int, window_s: float = RATE_WINDOW_S) -> int:
    """Pages per RAM section: ``default`` when unlimited, else about one rate window's
    budget (a whole default batch at 16 MB/s would be two seconds of silence, then a burst)."""
    if max_bandwidth <= 0:
        return default
    return max(MIN_BATCH_PAGES, min(default, int(max_bandwidth * window_s) // PAGE_SIZE))


def bandwidth_estimate(nbytes: int, seconds: float, previous: float = 0.0) -> float:
    """Bytes/s over a period; a period of no length keeps the previous estimate (as QEMU)."""
    if seconds <= 0 or nbytes < 0:
        return previous
    return nbytes / seconds


def should_switch_over(
    pending_bytes: int,
    bandwidth_bps: float,
    params: MigrationParameters,
    device_pending: int = 0,
    overhead_ms: float = 0.0,
) -> bool:
    """RAM and device state still to send fit in the downtime limit, less the fixed cost
    of the switchover (``overhead_ms``), or nothing is left.

    Device stop-copy bytes count because they, too, are sent while the VM is stopped.
    """
    total = pending_bytes + device_pending
    budget_ms = ram_budget_ms(params.downtime_limit_ms, overhead_ms)
    return total <= 0 or total <= switchover_threshold(bandwidth_bps, budget_ms)


@dataclass(frozen=True)
class ThrottleState:
    pct: int = 0  # vCPU throttle in percent; 0 = not throttled
    strikes: int = 0  # periods with dirtied > 50 % of sent since the last change


def next_throttle(
    state: ThrottleState,
    dirtied_bytes_in_period: int,
    sent_bytes_in_period: int,
    params: MigrationParameters,
    enabled: bool,
) -> ThrottleState:
    """Auto-converge after one sync period, as QEMU's ``migration_trigger_throttle``.

    Strikes need not be consecutive: QEMU resets its count only when it throttles.
    With auto-converge off nothing changes.
    """
    if not enabled:
        return state
    if dirtied_bytes_in_period * 100 <= sent_bytes_in_period * THROTTLE_TRIGGER_PCT:
        return state
    strikes = state.strikes + 1
    if strikes < STRIKES_TO_THROTTLE:
        return ThrottleState(state.pct, strikes)
    if state.pct == 0:
        pct = params.cpu_throttle_initial
    else:
        pct = state.pct + params.cpu_throttle_increment
    return ThrottleState(min(pct, params.max_cpu_throttle), 0)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str  # one line with the numbers that decided it
    expected_downtime_ms: float
    # The window's costs besides the bytes, as this decision weighed them: what
    # ``expected_at`` adds while a round is still being sent.
    overhead_ms: float = 0.0
    verify: VerifyCost = NO_VERIFY

    def expected_at(self, pending_bytes: int, device_pending: int, bandwidth_bps: float) -> float:
        """The expected downtime with this decision's costs at another remainder and
        bandwidth (query-migrate's live ``expected-downtime``)."""
        return window(
            pending_bytes, device_pending, bandwidth_bps, self.overhead_ms, self.verify
        ).total_ms


def _fit(
    pending_bytes: int,
    device_pending: int,
    bandwidth_bps: float,
    limit_ms: int,
    overhead_ms: float = 0.0,
) -> str:
    """``pending 812 MiB > threshold 96 MiB (stop-copy bandwidth 320 MiB/s × 300 ms)``:
    the bandwidth named is the one the stop-and-copy is expected to get (from the last
    rounds, switchover_bandwidth), not the migration's average nor one round's."""
    budget_ms = ram_budget_ms(limit_ms, overhead_ms)
    threshold = switchover_threshold(bandwidth_bps, budget_ms)
    total = pending_bytes + device_pending
    what = f"pending {size(total)}"
    if device_pending:
        what += f" ({size(pending_bytes)} RAM + {size(device_pending)} device state)"
    op = "≤" if total <= threshold else ">"
    budget = f"{limit_ms} ms" if not overhead_ms else f"{budget_ms:.0f} ms of {limit_ms}"
    bandwidth = f"stop-copy bandwidth {rate(bandwidth_bps)}"
    return f"{what} {op} threshold {size(threshold)} ({bandwidth} × {budget})"


def _awaiting(device_initial: int) -> str:
    """Why a switchover waits: VFIO asks to leave PRE_COPY only once a device's
    initial_bytes is 0 (REFERENCE §1), as QEMU's switchover-ack waits for the
    destination to have loaded that data."""
    return f"waiting for {size(device_initial)} of device initial data before the switchover"


def non_convergence_reason(
    pending_bytes: int,
    bandwidth_bps: float,
    dirty_rate_bps: float,
    params: MigrationParameters,
    device_pending: int = 0,
    throttle_pct: int = 0,
) -> str:
    """Why pending does not (yet) fit in the threshold, in words with the numbers."""
    threshold = switchover_threshold(bandwidth_bps, params.downtime_limit_ms)
    if bandwidth_bps <= 0:
        return "no round of dirty pages measured yet (round 0's bulk rate is not the stop-copy's)"
    if device_pending > threshold:
        # Iterating cannot shrink a device's stop-copy size: only limit or bandwidth can.
        return (
            f"device state {size(device_pending)} alone exceeds threshold {size(threshold)}; "
            f"it needs a downtime limit of at least "
            f"{math.ceil(expected_downtime_ms(device_pending, bandwidth_bps))} ms"
        )
    throttled = f" with vCPUs throttled {throttle_pct} %" if throttle_pct else ""
    if dirty_rate_bps >= bandwidth_bps:
        reason = (
            f"guest dirties {rate(dirty_rate_bps)}{throttled}, "
            f"faster than {rate(bandwidth_bps)} can be sent"
        )
        if throttle_pct >= params.max_cpu_throttle:
            reason += f"; throttle already at its maximum {params.max_cpu_throttle} %"
        return reason
    excess = pending_bytes + device_pending - threshold
    eta_s = excess / (bandwidth_bps - dirty_rate_bps)
    return (
        f"guest dirties {rate(dirty_rate_bps)}{throttled}, slower than {rate(bandwidth_bps)} "
        f"is sent: about {eta_s:.1f} s more at these rates"
    )


def decide(
    elapsed_ms: float,
    pending_bytes: int,
    bandwidth_bps: float,
    dirty_rate_bps: float,
    params: MigrationParameters,
    device_pending: int = 0,
    throttle_pct: int = 0,
    overhead_ms: float = 0.0,
    device_initial: int = 0,
    verify: VerifyCost = NO_VERIFY,
) -> Decision:
    """After a sync: switch over, keep iterating, or cancel (x-switchover-timeout/policy).

    The expected downtime is the whole window, pause to the destination's resume:
    ``device_pending``: device and vCPU state bytes still to send (pre-copy left plus the
    stop-copy estimates), sent at ``bandwidth_bps`` with the RAM;
    ``overhead_ms``: the switchover's measured fixed cost (the last dirty sync, pause,
    resume and its confirmation); ``verify``: the pre-resume check's digests.
    What iterating cannot shrink (the fixed cost, the digests of pages checked whatever
    is pending) comes out of the downtime limit, at most half of it (ram_budget_ms).
    ``device_initial``: the part of ``device_pending`` that is devices' initial pre-copy
    data: while any is left the VM does not switch over, however small the remainder
    (see _awaiting)."""
    total = pending_bytes + device_pending
    expected_window = window(pending_bytes, device_pending, bandwidth_bps, overhead_ms, verify)
    expected = expected_window.total_ms
    fixed = max(overhead_ms, 0.0) + verify.fixed_ms
    # The final round's pages are digested as well as sent: they go at this rate.
    stop_bw = verify.bandwidth(bandwidth_bps)
    limit = params.downtime_limit_ms
    fit = _fit(pending_bytes, device_pending, stop_bw, limit, fixed)
    converged = should_switch_over(pending_bytes, stop_bw, params, device_pending, fixed)
    if converged and device_initial <= 0:
        what = "nothing pending" if total <= 0 else fit
        why = f"converged: {what}; expected downtime {expected_window.describe()}"
        d = Decision("switchover", why, expected)
    else:
        if converged:
            why = _awaiting(device_initial)
        else:
            why = non_convergence_reason(
                pending_bytes, bandwidth_bps, dirty_rate_bps, params, device_pending, throttle_pct
            )
        timeout = params.switchover_timeout_ms
        if not timeout or elapsed_ms < timeout:
            d = Decision("continue", f"{fit}; {why}", expected)
        else:
            d = _timed_out(elapsed_ms, params, fit, why, expected, device_initial)
    return replace(d, overhead_ms=max(overhead_ms, 0.0), verify=verify)


def _timed_out(
    elapsed_ms: float,
    params: MigrationParameters,
    fit: str,
    why: str,
    expected: float,
    device_initial: int,
) -> Decision:
    """What x-switchover-policy says once x-switchover-timeout has passed unconverged."""
    timeout, limit = params.switchover_timeout_ms, params.downtime_limit_ms
    late = f"switchover timeout {timeout} ms passed (elapsed {elapsed_ms:.0f} ms)"
    policy = params.switchover_policy
    if policy == "force":
        # A forced switchover waits for devices' initial data too, as QEMU never
        # completes before switchover-ack whatever the reason: that data drains every
        # round while the VM runs (it never grows back), and switching without it would
        # move all of it (a vGPU's VRAM) into the downtime. Cancel does not wait.
        if device_initial > 0:
            wait = _awaiting(device_initial)
            return Decision("continue", f"forced: {late}; {fit}; {wait}", expected)
        return Decision(
            "switchover",
            f"forced: {late}; {fit}; expected downtime {expected:.0f} ms > limit {limit} ms",
            expected,
        )
    if policy == "cancel":
        return Decision("cancel", f"cancelled: {late}; {fit}; {why}", expected)
    if policy == "keep-going":
        return Decision("continue", f"{late}, policy keep-going: {fit}; {why}", expected)
    raise ConfigError(
        f"x-switchover-policy = {policy!r}: allowed values are keep-going, force, cancel"
    )


class RateLimiter:
    """max-bandwidth as a token bucket holding one 100 ms window of budget, as QEMU.

    The caller asks before each send how long to sleep first; time is an argument, so
    tests need no clock. Unlike QEMU's fixed windows, the debt of a send larger than a
    window carries over, so the long-run rate holds for any batch size.
    """

    def __init__(self, max_bandwidth: int, window_s: float = RATE_WINDOW_S) -> None:
        if max_bandwidth < 0:
            raise ConfigError(f"max-bandwidth = {max_bandwidth}: must be ≥ 0 (0 = unlimited)")
        if window_s <= 0:
            raise ConfigError(f"rate window = {window_s} s: must be > 0")
        self.max_bandwidth = max_bandwidth  # may change mid-migration, as in QEMU
        self.window_s = window_s
        self._busy_until: float | None = None  # when the bytes granted so far are paid for
        # Every channel's thread asks: the budget must be booked atomically, or two
        # channels could both spend the same window.
        self._lock = threading.Lock()

    def delay_for(self, nbytes: int, now: float) -> float:
        """Seconds to sleep before sending ``nbytes`` at time ``now`` (seconds)."""
        with self._lock:
            if self.max_bandwidth == 0:
                self._busy_until = None
                return 0.0
            start = now if self._busy_until is None else max(self._busy_until, now)
            self._busy_until = start + nbytes / self.max_bandwidth
            # Sending may run ahead of the rate by at most one window.
            return max(0.0, self._busy_until - self.window_s - now)


__all__ = [
    "NO_VERIFY",
    "PAGE_SIZE",
    "Decision",
    "RateLimiter",
    "ThrottleState",
    "VerifyCost",
    "Window",
    "bandwidth_estimate",
    "batch_pages",
    "decide",
    "expected_downtime_ms",
    "next_throttle",
    "non_convergence_reason",
    "ram_budget_ms",
    "rate",
    "should_switch_over",
    "size",
    "switchover_bandwidth",
    "switchover_threshold",
    "verify_cost",
    "window",
]
