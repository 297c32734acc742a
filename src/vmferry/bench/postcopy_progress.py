"""The guest's own speed across a migration, from the PROGRESS lines churn prints.

A thread follows the source's serial file and then the destination's, and stamps each
complete ``PROGRESS <pages> <bad>`` line with the host's monotonic clock when it sees
it (every 10 ms: a line is at most that late). The counter lives in guest memory, so
the two files make one rising series. Rates are read off that series by linear
interpolation between lines; past the last line the counter is taken as standing
still, which is what a guest that prints nothing is doing.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmferry.bench.postcopy_plan import PAGE

PROGRESS_RE = re.compile(rb"^PROGRESS (\d+) (\d+)$")
BAD_RE = re.compile(rb"^BAD page=(\d+) round=(\d+)$")
TAIL_POLL_S = 0.01


@dataclass(frozen=True)
class Sample:
    t: float  # host monotonic seconds when the line was seen
    pages: int  # pages the guest has rewritten so far
    bad: int  # pages it found wrong so far
    file: int = 0  # which serial file: 0 the source's, 1 the destination's


def parse_line(line: bytes) -> tuple[int, int] | None:
    """(pages, bad) of a PROGRESS line; None for any other line."""
    m = PROGRESS_RE.match(line.rstrip(b"\r"))
    return (int(m.group(1)), int(m.group(2))) if m else None


def rising(samples: Sequence[Sample]) -> list[Sample]:
    """The samples in time order, each with more pages than the one before (a line seen
    twice, or one from the source seen after the destination's, adds nothing)."""
    out: list[Sample] = []
    for s in sorted(samples, key=lambda s: s.t):
        if not out or s.pages > out[-1].pages:
            out.append(s)
    return out


def pages_at(samples: Sequence[Sample], t: float) -> float:
    """The counter at time t (interpolated; held flat outside the samples)."""
    if not samples:
        return math.nan
    ts = np.fromiter((s.t for s in samples), dtype=np.float64, count=len(samples))
    ps = np.fromiter((s.pages for s in samples), dtype=np.float64, count=len(samples))
    return float(np.interp(t, ts, ps))


def rate(samples: Sequence[Sample], t0: float, t1: float) -> float:
    """Bytes/s the guest rewrote between t0 and t1; NaN for an empty window or no samples,
    or a window that starts before the first line (nothing known there)."""
    if t1 <= t0 or not samples or t0 < samples[0].t:
        return math.nan
    return (pages_at(samples, t1) - pages_at(samples, t0)) * PAGE / (t1 - t0)


def handover_gap(samples: Sequence[Sample]) -> float:
    """Seconds from the source's last line to the destination's first: the pause the
    guest saw at the switch, measured the same way for both VMMs (to within a line and a
    poll); NaN if either side printed nothing."""
    src = [s.t for s in samples if s.file == 0]
    dst = [s.t for s in samples if s.file == 1]
    return min(dst) - max(src) if src and dst else math.nan


def longest_stall(samples: Sequence[Sample], t0: float, t1: float) -> float:
    """The longest stretch (s) inside [t0, t1] with no new line: how long the guest stood
    still at most (a pause, a throttle's sleep, a wait for a page), to within a line."""
    if t1 <= t0:
        return math.nan
    inside = [s.t for s in samples if t0 < s.t < t1]
    edges = np.array([t0, *inside, t1], dtype=np.float64)
    return float(np.max(np.diff(edges)))


@dataclass
class PhaseRates:
    before: float  # bytes/s, the window before the migration
    during: float  # from `migrate` to the migration's end
    after: float  # the window after it
    longest_stall_s: float  # during the migration
    bad_pages: int  # pages the guest found wrong, all told
    lines: int  # PROGRESS lines seen
    postcopy: float = math.nan  # bytes/s from the switch to post-copy to the end
    handover_s: float = math.nan  # the source's last line → the destination's first

    @property
    def during_ratio(self) -> float:
        """The guest's speed during the migration as a share of its speed before."""
        if not self.before > 0 or math.isnan(self.during):
            return math.nan
        return self.during / self.before


def phase_rates(
    samples: Sequence[Sample],
    before: float,
    start: float,
    end: float,
    after: float,
    switch: float = math.nan,
) -> PhaseRates:
    """Rates over [before, start], [start, end], [end, after] and, for a post-copy run,
    [switch, end] (host monotonic times)."""
    s = rising(samples)
    return PhaseRates(
        before=rate(s, before, start),
        during=rate(s, start, end),
        after=rate(s, end, after),
        longest_stall_s=longest_stall(s, start, end),
        bad_pages=max((x.bad for x in s), default=0),
        lines=len(s),
        postcopy=rate(s, switch, end) if math.isfinite(switch) else math.nan,
        handover_s=handover_gap(samples),
    )


class SerialTail:
    """Follows serial files (the source's, then the destination's) on a thread and
    collects their PROGRESS lines as Samples; the BAD lines too."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._offsets = [0] * len(self.paths)
        self._partial = [b""] * len(self.paths)
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self.bad_lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serial-tail", daemon=True)
        self._thread.start()

    def _read_new(self, i: int) -> None:
        try:
            with open(self.paths[i], "rb") as f:
                f.seek(self._offsets[i])
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        now = time.monotonic()
        self._offsets[i] += len(data)
        *lines, self._partial[i] = (self._partial[i] + data).split(b"\n")
        found = []
        for line in lines:
            got = parse_line(line)
            if got is not None:
                found.append(Sample(now, *got, file=i))
            elif BAD_RE.match(line.rstrip(b"\r")):
                self.bad_lines.append(line.decode(errors="replace").strip())
        with self._lock:
            self._samples += found

    def _run(self) -> None:
        while not self._stop.is_set():
            for i in range(len(self.paths)):
                with contextlib.suppress(OSError):
                    self._read_new(i)
            self._stop.wait(TAIL_POLL_S)

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def pages(self) -> int:
        """The highest counter seen so far (0 before the first line)."""
        with self._lock:
            return max((s.pages for s in self._samples), default=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> SerialTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "PhaseRates",
    "Sample",
    "SerialTail",
    "handover_gap",
    "longest_stall",
    "pages_at",
    "parse_line",
    "phase_rates",
    "rate",
    "rising",
]
