"""What ``vmferry bench migrate`` runs: the workloads, the cases (size × workload), the
plan and its options, the timings the runs share."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from vmferry.bench.selection import parse_selection
from vmferry.errors import ConfigError

Progress = Callable[[str], None]
MB = 1e6
GIB = 1 << 30
RESULT_RE = re.compile(rb"^RESULT ([0-9a-f]{16})$", re.MULTILINE)
BANNER = b"memtouch: vcpus="
VMFERRY = [sys.executable, "-m", "vmferry.cli.main"]
DOWNTIME_LIMIT_MS = 300
CHANNELS = 2
START_TIMEOUT_S = 30.0
# How long a guest may take to finish after its migration (or alone, for the reference):
# an 8 GiB case's guest runs ~100 s unpaced on this host when it is busy.
GUEST_END_TIMEOUT_S = 300.0
POLL_S = 0.05
GUEST_MARGIN_S = 3.0  # the guest's head start over the migration's timeout
REFERENCE_MEMORY = 2 * GIB  # RESULT does not depend on the RAM size: the reference is small


# ---- what to run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str  # as --workloads names it
    title: str
    cmdline: str  # memtouch's parameters; {rounds} is rounds_for(…)
    delay_s: float  # from the guest's first serial line to the migration (covers its fill)
    stop_first: bool = False  # stopped over QMP before the migration: an idle guest
    min_memory: int = 0
    # The fastest a round can go (s); None: the rounds are fixed (`rounds`). A running
    # guest must outlast the longest migration the bench allows: during QEMU's long
    # round 0 it runs at full speed (QEMU re-protects a page only as it sends it), and a
    # guest that ends first ends QEMU's source with it.
    round_s: float | None = None
    rounds: int = 3

    def rounds_for(self, lasting_s: float) -> int:
        """Rounds for a guest that goes on for at least ``lasting_s``."""
        if self.round_s is None:
            return self.rounds
        return math.ceil((lasting_s + self.delay_s) / self.round_s)

    def cmdline_for(self, lasting_s: float) -> str:
        return self.cmdline.format(rounds=self.rounds_for(lasting_s))


IDLE = Workload(
    "idle",
    "idle: guest stopped",
    # a guest that would idle for ~3 s of its own time: it only has to print RESULT after
    "wss=1M rate=1 rounds={rounds} seed=3",
    delay_s=0.2,
    stop_first=True,
)
WSS256 = Workload(
    "wss256",
    "256 MiB working set rewritten unpaced",
    "wss=256M rounds={rounds} seed=5",
    delay_s=1.0,  # its first fill of 256 MiB takes < 0.6 s on both
    round_s=0.06,  # 60-80 ms a round undisturbed on this host
)
WSS1G = Workload(
    "wss1g-512",
    "1 GiB working set at 512 MB/s",
    "wss=1G rate=512 rounds={rounds} seed=7",
    delay_s=2.5,  # the first fill of 1 GiB takes 2.1 s at 512 MB/s
    min_memory=2 * GIB,  # 1 GiB from 16 MiB up does not fit in a 1 GiB guest
    round_s=GIB / 512e6,  # 2.1 s: paced
)
WORKLOADS = {w.key: w for w in (IDLE, WSS256, WSS1G)}
SIZES_GIB = (1, 4, 8)


@dataclass(frozen=True)
class Case:
    memory: int
    workload: Workload

    @property
    def label(self) -> str:
        return f"{self.memory // GIB} GiB, {self.workload.key}"


@dataclass(frozen=True)
class MigratePlan:
    sizes: tuple[int, ...]  # GiB
    workloads: tuple[str, ...]  # keys of WORKLOADS
    repeats: int  # per VMM per case, in ABBA order
    ram_memory: int  # part 1
    ram_channels: tuple[int, ...]
    ram_repeat: int
    throughput: bool = True  # run part 1
    channels: int = CHANNELS
    downtime_limit_ms: int = DOWNTIME_LIMIT_MS

    @property
    def cases(self) -> tuple[Case, ...]:
        """Every size × workload that fits in a guest of that size, smallest first."""
        return tuple(
            Case(g * GIB, WORKLOADS[k])
            for g in self.sizes
            for k in self.workloads
            if WORKLOADS[k].min_memory <= g * GIB
        )

    def timeout_s(self, memory: int) -> float:
        """A migration not done by then is cancelled: "not converged"."""
        return 15.0 + 4.5 * memory / GIB

    def cmdline(self, case: Case) -> str:
        """The guest's parameters: the same for both VMMs; a running guest lasts past
        the timeout (and a few seconds of set-up)."""
        return case.workload.cmdline_for(self.timeout_s(case.memory) + GUEST_MARGIN_S)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``1,4,8`` → (1, 4, 8): guest sizes in GiB, each once, in order."""
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(
            f"--sizes {text!r}: want GiB counts separated by commas, e.g. 1,4,8"
        ) from None
    if not sizes or any(s < 1 or s > 64 for s in sizes):
        raise ConfigError(f"--sizes {text!r}: each size must be 1 to 64 GiB")
    return sizes


def parse_workloads(text: str) -> tuple[str, ...]:
    """``idle,wss256`` → those keys, in WORKLOADS' order."""
    return parse_selection("--workloads", text, WORKLOADS)


def make_plan(
    quick: bool = False,
    sizes: tuple[int, ...] | None = None,
    workloads: tuple[str, ...] | None = None,
    repeats: int | None = None,
    throughput: bool = True,
) -> MigratePlan:
    """The full run (1, 4, 8 GiB × all workloads, 2 repeats), or --quick (1 GiB, one
    repeat); --sizes, --workloads and --repeats override either."""
    if repeats is not None and not 1 <= repeats <= 20:
        raise ConfigError(f"--repeats {repeats}: must be 1 to 20")
    base_sizes = (1,) if quick else SIZES_GIB
    return MigratePlan(
        sizes=sizes or base_sizes,
        workloads=workloads or tuple(WORKLOADS),
        repeats=repeats or (1 if quick else 2),
        ram_memory=(1 if quick else 2) * GIB,
        ram_channels=(1, 2),
        ram_repeat=1 if quick else 2,
        throughput=throughput,
    )


def abba(repeats: int) -> list[str]:
    """The order the VMMs run in a case: QEMU, vmferry, vmferry, QEMU, …"""
    out: list[str] = []
    for i in range(repeats):
        pair = ["qemu", "vmferry"]
        out += pair if i % 2 == 0 else pair[::-1]
    return out


__all__ = [
    "IDLE",
    "WORKLOADS",
    "Case",
    "MigratePlan",
    "Workload",
    "abba",
    "make_plan",
    "parse_sizes",
    "parse_workloads",
]
