"""A VF's port on the host switch: its filter, the frames waiting for its RX engine,
its counters, and the hold on its transmit (``x-verify-hold-output``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmferry.devices.nic.wire import Addr


@dataclass
class OutputHold:
    """The frames a port's VF transmitted while its output is held (already tagged), in
    order, at most ``bound``. Past the bound the *oldest* is dropped (drop-from-front):
    nothing drains until the audit ends, so the newest frames are the ones whose senders
    have not yet given up, and a TCP peer that gets them sees the gap at once (duplicate
    ACKs, fast retransmit) instead of waiting for a timeout. QEMU's net queue (its
    filter-buffer, too) and a switch's egress queue drop the newest (tail drop): they
    drain continuously, so there the tail is what is late."""

    bound: int
    frames: deque[bytes] = field(default_factory=deque)
    dropping: bool = False  # rolled back: what is kept and what still comes is dropped
    held: int = 0  # frames taken in
    released: int = 0  # sent on when the audit passed
    dropped: int = 0  # discarded on a rollback
    overflow: int = 0  # pushed out over the bound

    def keep(self, frame: bytes) -> None:
        self.held += 1
        if self.dropping:
            self.dropped += 1
            return
        if len(self.frames) >= self.bound:
            self.frames.popleft()
            self.overflow += 1
        self.frames.append(frame)

    def figures(self) -> dict[str, int]:
        return {
            "held": self.held,
            "released": self.released,
            "dropped": self.dropped,
            "overflow": self.overflow,
        }


@dataclass
class Port:
    """One VF's port: its filter, the frames waiting for its RX engine, its counters."""

    mac: bytes
    vlan: int
    bound: int
    frames: deque[bytes] = field(default_factory=deque)
    wake: Callable[[], None] | None = None  # tells the VF a frame is waiting
    moved_to: Addr | None = None  # announced elsewhere: forward everything there
    running: bool = True  # its VF runs here: an announce of its MAC from elsewhere is stale
    epoch: int = 0  # changes when the VF starts or stops: older announce repeats end
    hold: OutputHold | None = None  # the VF's transmit, held (x-verify-hold-output)
    last_hold: OutputHold | None = None  # the latest hold, kept for its figures
    stale_announces: int = 0
    told: set[Addr] = field(default_factory=set)  # senders told where the MAC moved to
    redirects: int = 0
    defended_at: float | None = None
    detached_at: float | None = None
    dropped: int = 0  # over the bound
    forwarded: int = 0
    delivered: int = 0
    high_water: int = 0

    def figures(self) -> dict[str, Any]:
        """What ``ip -s link`` would say of this port, and where its MAC lives."""
        return {
            "mac": self.mac.hex(":"),
            "vlan": self.vlan,
            "running": self.running,
            "moved_to": None if self.moved_to is None else f"{self.moved_to[0]}:{self.moved_to[1]}",
            "queued": len(self.frames),
            "delivered": self.delivered,
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "high_water": self.high_water,
            "stale_announces": self.stale_announces,
            "redirects": self.redirects,
            "hold": None if self.last_hold is None else self.last_hold.figures(),
        }
