"""The downtime window as the policy weighs it: the bytes at the measured bandwidth, the
pre-resume check's digests and the fixed costs. Pure functions of measured inputs (no
I/O, no clocks); policy.decide weighs the window against the downtime limit. Units:
bytes, bytes/s, milliseconds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

PAGE_SIZE: Final = 4096


def expected_downtime_ms(pending_bytes: int, bandwidth_bps: float) -> float:
    """How long sending what is pending would take; infinite with no bandwidth."""
    if pending_bytes <= 0:
        return 0.0
    if bandwidth_bps <= 0:
        return math.inf
    return pending_bytes / bandwidth_bps * 1000


@dataclass(frozen=True)
class VerifyCost:
    """What the pre-resume verification adds to the downtime window, from measured inputs.

    ``pages``: pages it digests whatever is still pending (every page a DMA device can
    reach; with x-verify strict, every resident page). ``pending``: it digests the final
    round's pages too (x-verify on), so that part shrinks as the rounds do.
    ``ms_per_page``: the measured digest cost of one page (calibrated at migration start).
    ``setup_ms``: the measured cost of finding what to check (the resident pages, the set
    of pages to digest), paid inside the window whatever is pending.
    """

    pages: int = 0
    pending: bool = False
    ms_per_page: float = 0.0
    setup_ms: float = 0.0

    @property
    def fixed_ms(self) -> float:
        """The part iterating cannot shrink."""
        return max(self.pages, 0) * max(self.ms_per_page, 0.0) + max(self.setup_ms, 0.0)

    def pending_ms(self, pending_bytes: int) -> float:
        if not self.pending or pending_bytes <= 0:
            return 0.0
        return math.ceil(pending_bytes / PAGE_SIZE) * max(self.ms_per_page, 0.0)

    def bandwidth(self, bandwidth_bps: float) -> float:
        """Bytes/s of the final round once its pages must be digested as well as sent:
        each byte costs its send time plus its share of a page's digest."""
        per_byte_s = self.ms_per_page / 1e3 / PAGE_SIZE if self.pending else 0.0
        if bandwidth_bps <= 0 or per_byte_s <= 0:
            return bandwidth_bps
        return 1.0 / (1.0 / bandwidth_bps + per_byte_s)


NO_VERIFY: Final = VerifyCost()


def verify_cost(
    mode: str,
    resident: int,
    mapped: int,
    reachable: int,
    ms_per_page: float,
    scan_ms: float = 0.0,
    set_ms: float = 0.0,
) -> VerifyCost:
    """The pre-resume check's cost as the stop-and-copy will pay it (switchover's
    send_final_round), from this decision's counts and the migration's measured costs.

    ``resident``: pages holding data; ``mapped``: pages some device's IOMMU maps;
    ``reachable``: those of them resident; ``scan_ms``: finding the resident pages
    (O(RAM)); ``set_ms``: building x-verify on's set from them. strict digests every
    resident page, after the scan; on digests the final round's pages (the pending ones,
    shrinking with the rounds) and the reachable ones, and scans only where a device maps
    some; off: nothing."""
    if mode == "off":
        return NO_VERIFY
    if mode == "strict":
        return VerifyCost(resident, ms_per_page=ms_per_page, setup_ms=scan_ms)
    setup = scan_ms + set_ms if mapped > 0 else 0.0
    return VerifyCost(reachable if mapped > 0 else 0, True, ms_per_page, setup)


@dataclass(frozen=True)
class Window:
    """The expected downtime in its parts (ms): pause to the destination's resume."""

    state_ms: float  # final RAM, device and vCPU state at the stop-copy bandwidth
    verify_ms: float  # the pre-resume check's digests
    fixed_ms: float  # pause, the last dirty sync, resume and its confirmation

    @property
    def total_ms(self) -> float:
        return self.state_ms + self.verify_ms + self.fixed_ms

    def describe(self) -> str:
        """``212 ms (RAM and state 120, verify 60, fixed 32)``; the bare total when only
        bytes count."""
        if not self.verify_ms and not self.fixed_ms:
            return f"{self.total_ms:.0f} ms"
        parts = f"RAM and state {self.state_ms:.0f}"
        if self.verify_ms:
            parts += f", verify {self.verify_ms:.0f}"
        return f"{self.total_ms:.0f} ms ({parts}, fixed {self.fixed_ms:.0f})"


def window(
    pending_bytes: int,
    device_pending: int,
    bandwidth_bps: float,
    overhead_ms: float = 0.0,
    verify: VerifyCost = NO_VERIFY,
) -> Window:
    """The whole downtime window the stop-copy is expected to take: the bytes at the
    measured bandwidth, the verification's digests, the fixed costs."""
    return Window(
        expected_downtime_ms(pending_bytes + device_pending, bandwidth_bps),
        verify.fixed_ms + verify.pending_ms(pending_bytes),
        max(overhead_ms, 0.0),
    )


__all__ = [
    "NO_VERIFY",
    "PAGE_SIZE",
    "VerifyCost",
    "Window",
    "expected_downtime_ms",
    "verify_cost",
    "window",
]
