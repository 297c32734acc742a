"""A cap on everything a destination reads, over all channels of one migration.

The stream's own checks bound each section and every address; this bounds the whole: a
source that never stops (broken, or hostile) is cut off at a size no real migration of
the announced VM reaches, instead of being read for ever. Until the CONF section has
said how big the VM is, the cap is what a CONF may hold.
"""

from __future__ import annotations

from vmferry.errors import StreamError
from vmferry.migration.loader import StreamHead
from vmferry.migration.stream import CONF as CONF_TAG
from vmferry.migration.stream import MAX_PAYLOAD, SECTION_HEADER_SIZE, STREAM_HEADER_SIZE
from vmferry.migration.transport import Source

# Pre-copy re-sends what the guest dirtied, so a long migration sends RAM many times over;
# a pathological but honest one stays well under this.
RAM_FACTOR = 16
DEVICE_ALLOWANCE = 4 << 30  # per device: VRAM pre-copy rounds, stop-copy state
FIXED_ALLOWANCE = 1 << 30  # vCPU state, digests, section headers
HEAD_LIMIT = STREAM_HEADER_SIZE + SECTION_HEADER_SIZE + MAX_PAYLOAD[CONF_TAG]


def stream_cap(head: StreamHead) -> int:
    devices = head.setup.get("devices", [])
    ndev = len(devices) if isinstance(devices, list) else 0
    return RAM_FACTOR * head.config.memory + DEVICE_ALLOWANCE * ndev + FIXED_ALLOWANCE


class StreamBudget:
    """Shared by the sources of one migration; each source counts its own bytes."""

    def __init__(self, limit: int = HEAD_LIMIT) -> None:
        self.limit = limit
        self.why = "before the VM's configuration (CONF) is known"
        self._sources: list[CappedSource] = []

    def source(self, inner: Source) -> CappedSource:
        s = CappedSource(inner, self)
        self._sources.append(s)
        return s

    def allow(self, head: StreamHead) -> None:
        """Raise the cap to what a migration of the VM ``head`` announces may send."""
        self.limit = stream_cap(head)
        self.why = (
            f"{RAM_FACTOR} × the VM's {head.config.memory} bytes of RAM plus allowances for "
            "device and vCPU state"
        )

    @property
    def total(self) -> int:
        return sum(s.position for s in self._sources)

    def charge(self, name: str, nbytes: int) -> None:
        total = self.total
        if total + nbytes > self.limit:
            raise StreamError(
                f"{name}: the migration would pass {self.limit} bytes in all ({self.why}) "
                f"at {total}: refusing the rest of a stream no migration of this VM sends"
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
