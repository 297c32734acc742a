"""What a migration measures, as plain data; query-migrate and the report are views of it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class RoundRecord:
    """One pre-copy round (round 0 sends all of RAM; the last one is the stop-and-copy)."""

    index: int
    start_s: float  # seconds since the migration started
    duration_s: float
    pages: int  # pages sent (normal + zero)
    zero_pages: int
    bytes: int  # bytes on the wire
    dirty_pages: int  # pages found dirty at the sync that ended the round
    dirty_rate: float  # bytes/s the guest dirtied during the round
    bandwidth: float  # bytes/s achieved during the round
    throttle_pct: int = 0
    stop_copy: bool = False
    device_bytes: int = 0  # device state sent in this round (included in ``bytes``)


@dataclass
class DowntimeBreakdown:
    """Where the downtime went, in milliseconds (source pause → destination resume)."""

    pause_ms: float = 0.0  # kicking every vCPU out of KVM_RUN
    final_ram_ms: float = 0.0  # last dirty log, last pages
    cpu_state_ms: float = 0.0  # capture + send of vCPU/VM state
    device_state_ms: float = 0.0  # device stop-copy streams
    verify_ms: float = 0.0  # digests on both sides and the comparison
    resume_ms: float = 0.0  # destination builds vCPUs and starts them, confirmation
    total_ms: float = 0.0


@dataclass
class VerifyResult:
    # off | passed | failed; x-verify on: pending from the pre-resume check until the
    # audit passed, unaudited if it could not finish
    status: str = "off"
    pages_checked: int = 0
    mismatched_pages: list[int] = field(default_factory=list)  # first few, RAM page numbers
    cpu_state: str = "off"  # off | passed | failed
    detail: str = ""
    mode: str = "off"  # x-verify: on | strict | off
    # "pre-resume": {pages, ms, status}; "audit": {pages, ms, source_ms, status}; a phase
    # that did not run is absent.
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Where the verification is (query-migrate's x-verify-phase): "" before the
    # switchover, then pre-resume, audit (x-verify on: the VM runs at the destination and
    # the source is held until it passed), then passed or failed.
    phase: str = ""


@dataclass
class PostcopyFigures:
    """Post-copy's figures (query-migrate: ram.postcopy-requests, ram.postcopy-bytes,
    postcopy-blocktime, postcopy-vcpu-blocktime; vmferry adds the rest)."""

    active: bool = False  # the switch to post-copy happened
    switch_s: float = 0.0  # seconds from the start to the switch
    requests: int = 0  # page requests served (QEMU's postcopy-requests)
    bytes: int = 0  # page bytes sent after the switch (QEMU's postcopy-bytes)
    urgent_pages: int = 0  # pages sent to answer a request
    pushed_pages: int = 0  # pages sent by the background push
    owed_pages: int = 0  # pages the destination lacked at the switch
    blocktime_ms: float = 0.0  # every vCPU waiting at once (QEMU's postcopy-blocktime)
    vcpu_blocktime_ms: list[float] = field(default_factory=list)  # per vCPU
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max: fault→land
    recoveries: int = 0  # links re-made after postcopy-paused
    complete_s: float = 0.0  # seconds from the start until the last page landed


@dataclass
class MigrationStats:
    """Counters with QEMU's meanings (query-migrate ``ram``), plus vmferry's own."""

    status: str = "none"
    total_ram: int = 0
    transferred: int = 0
    duplicate: int = 0  # zero pages (sent as flags)
    normal: int = 0  # pages sent with data
    remaining: int = 0  # bytes still dirty
    dirty_sync_count: int = 0
    dirty_pages_rate: float = 0.0  # pages/s
    mbps: float = 0.0  # megabits/s, as QEMU reports it
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    setup_ms: float = 0.0
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    expected_downtime_ms: float = 0.0
    throttle_pct: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    downtime: DowntimeBreakdown = field(default_factory=DowntimeBreakdown)
    verify: VerifyResult = field(default_factory=VerifyResult)
    device_transferred: int = 0  # QEMU's vfio.transferred: device state bytes
    devices: list[dict[str, object]] = field(default_factory=list)  # per-device figures
    error: str = ""
    convergence: str = ""  # why the migration switched over, or why it could not
    postcopy: PostcopyFigures = field(default_factory=PostcopyFigures)

    def snapshot(self) -> MigrationStats:
        """A copy that shares nothing mutable with this one (for a reader on another
        thread while the migration writes on)."""
        return replace(
            self,
            rounds=list(self.rounds),
            downtime=replace(self.downtime),
            verify=replace(
                self.verify,
                mismatched_pages=list(self.verify.mismatched_pages),
                phases={k: dict(v) for k, v in self.verify.phases.items()},
            ),
            devices=[dict(d) for d in self.devices],
            postcopy=replace(
                self.postcopy,
                vcpu_blocktime_ms=list(self.postcopy.vcpu_blocktime_ms),
                latency_ms=dict(self.postcopy.latency_ms),
            ),
        )


class BandwidthWindow:
    """Bytes/s measured over windows of at least ``window_s`` (QEMU updates its figures
    every 100 ms): what ``mbps`` says while a round is still being sent. Time is an
    argument, so it is tested without a clock."""

    def __init__(self, window_s: float = 0.1) -> None:
        self.window_s = window_s
        self.rate = 0.0  # bytes/s over the last complete window; 0 before the first
        self._start: float | None = None
        self._bytes = 0

    def start(self, now: float) -> None:
        """Begin a window now (a round starts: the time before it sent nothing)."""
        self._start, self._bytes = now, 0

    def add(self, nbytes: int, now: float) -> bool:
        """Count bytes that went out by ``now``; True when a window closed (``rate`` new)."""
        if self._start is None:
            self.start(now)
        assert self._start is not None
        self._bytes += nbytes
        elapsed = now - self._start
        if elapsed < self.window_s:
            return False
        self.rate = self._bytes / elapsed
        self.start(now)
        return True
