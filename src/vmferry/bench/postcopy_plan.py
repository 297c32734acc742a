"""What ``vmferry bench postcopy`` runs: the guest, the link, the four cases and their order.

The guest is ``churn`` (guests/churn.c): one vCPU rewriting a 1 GiB working set as fast
as it can (~2.5 GB/s undisturbed on this host), each page checked before it is
rewritten, a PROGRESS line every 32 MiB. All of its 2 GiB of RAM is filled first (the
host writes incompressible data above 32 MiB, ``bench.fill``; the guest then rewrites
its working set), so every page costs the link a page.

The link is loopback under a ``max-bandwidth`` cap of 150 MB/s, on both VMMs (QEMU's
``max-postcopy-bandwidth`` too: QEMU lifts the cap at the switch otherwise). Why 150:
the guest dirties its whole working set every ~0.4 s, so each pre-copy round after the
first must carry 1 GiB again (7.2 s at 150 MB/s) while the downtime limit allows 45 MB
(300 ms at 150 MB/s): without a throttle pre-copy never converges. And 150 MB/s is
below what either VMM sends over loopback on this host's 2 busy cores with the guest
spinning on one of them (vmferry ~300 MB/s into a fresh destination, QEMU ~490 MB/s;
docs/benchmarks.md), so the link, not the CPU, sets the pace for both. Each case's own
round-0 rate is the "measured bandwidth" of its ratio.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from vmferry.errors import ConfigError

MB = 1e6
MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
IMAGE = "churn"
VMFERRY = [sys.executable, "-m", "vmferry.cli.main"]
CAP = 150_000_000  # bytes/s, see above
DOWNTIME_LIMIT_MS = 300
CHANNELS = 2
REPORT_PAGES = 8192  # a PROGRESS line every 32 MiB rewritten
SEED = 7
BEFORE_S = 3.0  # the guest's own speed measured this long before the migration
AFTER_S = 3.0  # … and this long after it
POLL_S = 0.05
START_TIMEOUT_S = 60.0  # a process's set-up (QEMU pre-faults its RAM file, vmferry fills)
WARM_TIMEOUT_S = 60.0  # the guest's first two passes over its working set


@dataclass(frozen=True)
class Case:
    key: str
    vmm: str  # "vmferry" | "qemu"
    postcopy: bool  # pre-copy then post-copy (migrate-start-postcopy after round 0)
    title: str


CASES = (
    Case("vmferry-precopy", "vmferry", False, "vmferry pre-copy, auto-converge"),
    Case("vmferry-postcopy", "vmferry", True, "vmferry pre-copy then post-copy"),
    Case("qemu-precopy", "qemu", False, "QEMU 7.2 pre-copy, auto-converge"),
    Case("qemu-postcopy", "qemu", True, "QEMU 7.2 postcopy-ram"),
)
CASE_BY_KEY = {c.key: c for c in CASES}


@dataclass(frozen=True)
class PostcopyPlan:
    memory: int  # guest RAM, bytes
    wss: int  # the working set the guest rewrites, bytes
    repeats: int  # runs per case, in ABBA order
    cap: int = CAP  # bytes/s
    downtime_limit_ms: int = DOWNTIME_LIMIT_MS
    channels: int = CHANNELS
    precopy_timeout_s: float = 150.0  # not converged by then: cancelled, reported so
    postcopy_timeout_s: float = 120.0
    before_s: float = BEFORE_S
    after_s: float = AFTER_S
    cases: tuple[str, ...] = tuple(c.key for c in CASES)

    @property
    def cmdline(self) -> str:
        """churn's parameters, the same for both VMMs: it runs until the bench ends it."""
        return f"wss={self.wss // MIB}M report={REPORT_PAGES} seed={SEED}"

    @property
    def wss_pages(self) -> int:
        return self.wss // PAGE

    @property
    def once_s(self) -> float:
        """Seconds to send the guest's RAM once at the cap (the ratio uses the measured
        rate; this sizes the timeouts)."""
        return self.memory / self.cap

    def timeout_s(self, case: Case) -> float:
        return self.postcopy_timeout_s if case.postcopy else self.precopy_timeout_s


def make_plan(quick: bool = False, repeats: int | None = None) -> PostcopyPlan:
    """The full run (2 GiB guest, 1 GiB working set, 2 repeats) or --quick (1 GiB guest,
    512 MiB working set, one repeat); --repeats overrides either."""
    if repeats is not None and not 1 <= repeats <= 10:
        raise ConfigError(f"--repeats {repeats}: must be 1 to 10")
    if quick:
        return PostcopyPlan(
            memory=GIB,
            wss=512 * MIB,
            repeats=repeats or 1,
            precopy_timeout_s=75.0,
            postcopy_timeout_s=60.0,
            before_s=2.0,
            after_s=2.0,
        )
    return PostcopyPlan(memory=2 * GIB, wss=GIB, repeats=repeats or 2)


def order(cases: tuple[str, ...], repeats: int) -> list[tuple[str, int]]:
    """(case, repeat) in ABBA order: the cases forward, then backward, …; drift on the
    host then weighs on every case alike."""
    out: list[tuple[str, int]] = []
    for r in range(repeats):
        seq = cases if r % 2 == 0 else cases[::-1]
        out += [(c, r) for c in seq]
    return out


__all__ = [
    "CAP",
    "CASES",
    "CASE_BY_KEY",
    "Case",
    "PostcopyPlan",
    "make_plan",
    "order",
]
