"""A migration's status as query-migrate shows it, with QEMU's names.

A ``StrEnum``: a member equals the string QMP emits (``MigrationStatus.ACTIVE ==
"active"``), so stats, events and clients that hold plain strings keep working.
"""

from __future__ import annotations

import enum


class MigrationStatus(enum.StrEnum):
    """QEMU's ``MigrationStatus`` values that vmferry reaches.

    Post-copy: ``postcopy-active`` (the VM runs at the destination, pages still come),
    ``postcopy-paused`` (the link broke after the switch: both sides wait, nothing is
    lost) and ``postcopy-recover`` (a new link is being set up); ``pre-switchover`` and
    ``wait-unplug`` are not used.
    """

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  # the VM is paused: stop-and-copy and the hand-over
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"


#: What a cancelling migration may still become. A cancel loses when it comes too late:
#: a file already whole ends "completed", a hand-over already made ends "failed" at worst.
AFTER_CANCELLING: frozenset[MigrationStatus] = frozenset(
    {MigrationStatus.CANCELLED, MigrationStatus.FAILED, MigrationStatus.COMPLETED}
)

#: Statuses a migration does not leave.
FINAL: frozenset[MigrationStatus] = frozenset(
    {MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED}
)


def may_become(current: str, new: str) -> bool:
    """Whether a migration showing ``current`` may show ``new`` next: once cancelling,
    only an end in ``AFTER_CANCELLING`` (a thread that moved on, e.g. to "device", before
    it saw the cancel must not hide it)."""
    if current == MigrationStatus.CANCELLING:
        return new in AFTER_CANCELLING
    return True


__all__ = ["AFTER_CANCELLING", "FINAL", "MigrationStatus", "may_become"]
