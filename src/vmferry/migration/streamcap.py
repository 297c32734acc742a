"""A cap on what a destination reads per pre-copy round, over all channels of a migration.

The stream's own checks bound each section and every address; this bounds the rest. A
total cap cannot tell a hostile source from an honest migration that never converges
(switchover-timeout 0 with keep-going re-sends a rewritten working set for as long as
the guest rewrites it), so the bound is per round instead: between two RND markers an
honest source sends each page at most once, plus each device's pre-copy data, plus
headers. A source that sends more than that between markers (broken, or hostile) is cut
off there; one that goes on sending well-formed rounds is a migration that has not
converged, and ends when its source gives up (its x-switchover-timeout, a cancel) or
goes silent (x-peer-timeout). Until the CONF section has said how big the VM is, the cap
is what a CONF may hold.
"""

from __future__ import annotations

import threading

from vmferry.errors import StreamError
from vmferry.migration.codec import CONF as CONF_TAG
from vmferry.migration.codec import (
    MAX_PAYLOAD,
    SECTION_HEADER_SIZE,
    STREAM_HEADER_SIZE,
    ConfigRecord,
)
from vmferry.migration.transport import Source

DEVICE_ALLOWANCE = 4 << 30  # per device and round: VRAM pre-copy, stop-copy state
# Per page of RAM: its run-table entry (16 bytes), its VRFY digest (16), section headers.
PER_PAGE_OVERHEAD_DIVISOR = 64  # 64 of a page's 4096 bytes
FIXED_ALLOWANCE = 1 << 30  # vCPU state, device summaries, slack
# The skew between channels: when the main channel's RND marker is read, an extra channel
# may still hold this round's pages, or already the next round's, in its socket buffers
# (tcp_rmem + tcp_wmem, a few MiB by default; allowed generously).
CHANNEL_SKEW_ALLOWANCE = 64 << 20
HEAD_LIMIT = STREAM_HEADER_SIZE + SECTION_HEADER_SIZE + MAX_PAYLOAD[CONF_TAG]


def round_cap(head: ConfigRecord) -> int:
    """The most one round (or the stop-and-copy with the state after it) may carry."""
    ndev = len(head.devices)
    ram = head.config.memory
    skew = CHANNEL_SKEW_ALLOWANCE * (head.channels - 1)
    return ram + ram // PER_PAGE_OVERHEAD_DIVISOR + DEVICE_ALLOWANCE * ndev + FIXED_ALLOWANCE + skew


class StreamBudget:
    """Shared by the sources of one migration; each source counts its own bytes, and the
    main channel's reader calls ``next_round`` at each RND marker."""

    def __init__(self, limit: int = HEAD_LIMIT) -> None:
        self.limit = limit  # per round, once CONF is known
        self.why = "before the VM's configuration (CONF) is known"
        self.round = 0
        self._base = 0  # the total when the current round began
        self._lock = threading.Lock()  # channels' threads charge, the main one advances
        self._sources: list[CappedSource] = []

    def source(self, inner: Source) -> CappedSource:
        s = CappedSource(inner, self)
        self._sources.append(s)
        return s

    def allow(self, head: ConfigRecord) -> None:
        """Set the per-round cap to what a round of the VM ``head`` announces may send."""
        with self._lock:
            self.limit = round_cap(head)
            self._base = self.total
        self.why = (
            f"one round of the VM's {head.config.memory} bytes of RAM plus allowances for "
            "device and vCPU state"
        )

    def next_round(self) -> None:
        """An RND marker was read: the next round has a full allowance of its own."""
        with self._lock:
            self.round += 1
            self._base = self.total

    @property
    def total(self) -> int:
        return sum(s.position for s in self._sources)

    def charge(self, name: str, nbytes: int) -> None:
        with self._lock:
            used = self.total - self._base
            if used + nbytes > self.limit:
                raise StreamError(
                    f"{name}: round {self.round} would pass {self.limit} bytes ({self.why}) "
                    f"at {used}: refusing the rest of a round no migration of this VM sends"
                )


class CappedSource:
    """A Source that refuses to read past its budget (checked before each read)."""

    def __init__(self, inner: Source, budget: StreamBudget) -> None:
        self.inner = inner
        self.budget = budget

    @property
    def position(self) -> int:
        return self.inner.position

    def readinto(self, buf: memoryview) -> None:
        self.budget.charge(getattr(self.inner, "name", "stream"), buf.nbytes)
        self.inner.readinto(buf)

    def close(self) -> None:
        self.inner.close()
