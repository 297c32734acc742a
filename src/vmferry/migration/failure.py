"""Why an outgoing migration failed: in words for query-migrate, and as the source
table's event (ERROR, PEER_CLOSED, PEER_SILENT, DESTINATION_FAILED, GUEST_ENDED, HALTED).

An errno says how a socket failed, not why: a destination that fails says why on the
reply path before it hangs up, which the sender may see first as a reset or a broken
pipe; a destination that stops answering is seen by the watch (or a send timeout).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.errors import MigrationCancelled, MigrationError, VmferryError
from vmferry.migration.channel import PeerClosed, PeerSilent
from vmferry.migration.handover import DestinationRefused
from vmferry.migration.liveness import PeerWatch, is_timeout
from vmferry.migration.source_machine import SourceEvent

Ev = SourceEvent
FAILED_SAYS_WHY_S = 1.0  # how long a broken connection waits for the "failed" before it


class GuestEnded(MigrationError):
    """The guest powered off or crashed during the migration."""


class LinkBroken(MigrationError):
    """Post-copy's link was reset or went silent: paused, for a new one."""


@dataclass(frozen=True)
class Circumstances:
    """What the source was doing when ``e`` happened."""

    phase: str  # "round 3", "the switchover", … (source_machine.PHASE)
    peer_timeout_s: float
    watch: PeerWatch | None  # the reply path's reader (live migrations, after CONF)
    connected: bool  # a live connection was open (a file has none)
    cancel_reason: str | None  # the user's cancel, when it came first
    released: bool  # "go" was sent: the VM must not run here on its own


def describe(e: BaseException, c: Circumstances) -> str:
    """What went wrong, in words (the stats' ``error``)."""
    if c.cancel_reason is not None:
        return c.cancel_reason
    if c.released and isinstance(e, VmferryError):
        return str(e)  # it says why the VM stays paused here
    watch = c.watch
    peer = c.connected and isinstance(e, OSError | PeerClosed)
    if watch is not None and (watch.silent or is_timeout(e)):
        return f"the destination stopped answering for {c.peer_timeout_s:.1f} s during {c.phase}"
    if peer and watch is not None:
        watch.wait_ended(FAILED_SAYS_WHY_S)
        if watch.failure:
            return f"the destination refused the VM: {watch.failure}"
    if peer:
        return f"the destination closed the connection during {c.phase}"
    if isinstance(e, VmferryError | OSError):
        return str(e)
    return f"internal error: {e!r}"


def classify(e: BaseException, c: Circumstances) -> SourceEvent:
    """The table's event for ``e`` (after ``describe``, which waits for a "failed")."""
    if isinstance(e, MigrationCancelled):
        return Ev.HALTED
    if isinstance(e, GuestEnded):
        return Ev.GUEST_ENDED
    if isinstance(e, LinkBroken):
        return Ev.LINK_BROKEN
    if isinstance(e, DestinationRefused):
        return Ev.DESTINATION_FAILED
    if not c.connected:
        return Ev.ERROR  # a file: no peer to lose
    watch = c.watch
    if isinstance(e, PeerSilent) or is_timeout(e) or (watch is not None and watch.silent):
        return Ev.PEER_SILENT
    if isinstance(e, OSError | PeerClosed):
        if watch is not None and watch.failure:
            return Ev.DESTINATION_FAILED  # it gave up first and said why
        return Ev.PEER_CLOSED
    return Ev.ERROR


__all__ = ["Circumstances", "GuestEnded", "LinkBroken", "classify", "describe"]
