"""One contract for everything that migrates: RAM, the vCPUs and the devices.

The round loop asks each part the same questions — start tracking, what changed since the
last sync, how much is still to send (and how much of it must be across before the
switchover), save what can go while the VM runs, save the rest with it stopped — and
never looks inside one (Cloud Hypervisor's ``Migratable``; QEMU's SaveVMHandlers).
The destination feeds each part its records back through ``Loadable``.
Implementations: ``guest_ram.RamMigration``, ``vcpus.VcpuMigration``,
``devices.SourceDevices`` (all devices, fanned out) and ``devices.DestinationDevices``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol, TypeVar, runtime_checkable

from vmferry.memory.dirty import DirtyBitmap
from vmferry.migration.stream import StreamWriter


class Pending(NamedTuple):
    """What a part still has to send, as the policy weighs it (policy.decide)."""

    bytes: int  # everything left, the stop-and-copy's estimate included
    initial_bytes: int = 0  # the part that must be across before the switchover

    def plus(self, other: Pending) -> Pending:
        # Not ``+``: a tuple's ``+`` concatenates.
        return Pending(self.bytes + other.bytes, self.initial_bytes + other.initial_bytes)


def total_pending(parts: Iterable[Migratable]) -> Pending:
    """Pending summed over the parts."""
    out = Pending(0)
    for p in parts:
        out = out.plus(p.pending())
    return out


@runtime_checkable
class Migratable(Protocol):
    """The source side of one part of the VM, driven round by round."""

    @property
    def name(self) -> str:
        """What the part is called in figures and errors (``ram``, ``vcpus``, …)."""
        ...

    def start_dirty_tracking(self) -> None:
        """From here on every change is tracked (the first round sends everything)."""
        ...

    def stop_dirty_tracking(self) -> None:
        """Tracking off: after the hand-over, or a rollback. Safe to call twice."""
        ...

    def collect_dirty(self, into: DirtyBitmap) -> None:
        """OR the RAM pages this part dirtied since the last collect into ``into``."""
        ...

    def pending(self) -> Pending: ...

    def save_precopy(self, writer: StreamWriter) -> int:
        """Send what can go while the VM runs (one round's worth); bytes written."""
        ...

    def save_final(self, writer: StreamWriter) -> int:
        """With the VM stopped: send the rest; bytes written."""
        ...


R_contra = TypeVar("R_contra", contravariant=True)


@runtime_checkable
class Loadable(Protocol[R_contra]):
    """The destination side of one part: its records, in stream order, then a commit
    that checks the whole is consistent (or raises) before the VM may run."""

    def load(self, record: R_contra) -> None: ...

    def commit(self) -> None: ...


def check_migratable(part: object) -> Migratable:
    """``part`` as a Migratable, or a TypeError naming what it lacks (the conformance
    check for new parts: runtime_checkable looks only at names, so this also calls the
    cheap questions once)."""
    if not isinstance(part, Migratable):
        wanted = [m for m in _MIGRATABLE_METHODS if not callable(getattr(part, m, None))]
        raise TypeError(f"{type(part).__name__} is not Migratable: it lacks {', '.join(wanted)}")
    p = part.pending()
    if not isinstance(p, Pending) or p.bytes < 0 or not 0 <= p.initial_bytes <= p.bytes:
        raise TypeError(
            f"{part.name}: pending() answered {p!r}, not a Pending with 0 ≤ initial ≤ bytes"
        )
    return part


_MIGRATABLE_METHODS = (
    "start_dirty_tracking",
    "stop_dirty_tracking",
    "collect_dirty",
    "pending",
    "save_precopy",
    "save_final",
)
