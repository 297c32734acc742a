"""The destination's answers on the reply path: ``accepted`` after the CONF, ``ready``
after END, and — once the source said ``go`` — ``resumed``.

Each wait ends in the answer, a ``DestinationRefused`` (it said ``failed``, or sent
something else), or the watch's PeerSilent/PeerClosed; the driver turns which into the
source table's event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vmferry.errors import MigrationError
from vmferry.migration.channel import ReplyPath
from vmferry.migration.codec import (
    Accepted,
    Audit,
    AuditChunk,
    Audited,
    Failed,
    Go,
    Ready,
    ReplyMessage,
    Resumed,
)
from vmferry.migration.liveness import PeerWatch

SETUP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 120.0  # destination loads the last data and verifies
RESUMED_TIMEOUT_S = 30.0
AUDITED_TIMEOUT_S = 120.0  # the destination compares as chunks come: its verdict is quick
LOST_IN_AUDIT = (
    "; the VM stays paused here (postmigrate) because the destination may be running it "
    "or have stopped it there (it was lost during the audit after resume)"
)


class DestinationRefused(MigrationError):
    """The destination said ``failed`` (or answered out of turn): it gave up first."""

    def __init__(self, message: str, verify: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.verify = verify  # what its check found, when that was why


class StillReleased(MigrationError):
    """The destination was lost after ``go``: it may be running the VM."""


class Handover:
    """The source's half of the reply-path conversation."""

    def __init__(self, reply: ReplyPath, watch: PeerWatch) -> None:
        self.reply = reply
        self.watch = watch

    def await_accepted(self) -> None:
        """The destination checks the VM and its devices before anything moves: an
        incompatible one fails the migration while the VM runs on."""
        msg = self.watch.next(SETUP_TIMEOUT_S, "the destination's set-up answer")
        if not isinstance(msg, Accepted):
            raise _refused("the destination refused", msg)

    def await_ready(self) -> Ready:
        msg = self.watch.next(READY_TIMEOUT_S, "ready from the destination")
        if not isinstance(msg, Ready):
            raise _refused("the destination refused the VM", msg)
        return msg

    def send_go(self) -> None:
        self.reply.send(Go())

    def await_resumed(self) -> float:
        """The destination's resume time (ms). A "failed" means it did not start the
        guest (it gave up waiting for "go"): the VM is still only here."""
        try:
            msg = self.watch.next(RESUMED_TIMEOUT_S, "confirmation that the VM resumed")
        except MigrationError as e:
            raise StillReleased(
                f"{e}; the VM stays paused here (postmigrate) because the "
                "destination may be running it"
            ) from e
        if isinstance(msg, Failed):
            raise DestinationRefused(f"the destination refused the VM: {msg.error}")
        return msg.resume_ms if isinstance(msg, Resumed) else 0.0

    def send_audit(self, chunks: Iterable[tuple[AuditChunk, float]], npages: int) -> float:
        """Every chunk of the audit, each behind the line that gives its length; the ms
        the source's digests took."""
        digest_ms = 0.0
        try:
            for chunk, ms in chunks:
                digest_ms += ms
                body = chunk.encode(npages)
                self.reply.send_with(Audit(len(body)), body)
        except OSError as e:
            raise StillReleased(f"could not send the audit: {e}{LOST_IN_AUDIT}") from e
        return digest_ms

    def await_audited(self) -> Audited:
        """The destination's verdict; lost or out of turn, it may be running the VM."""
        try:
            msg = self.watch.next(AUDITED_TIMEOUT_S, "the audit's verdict")
        except MigrationError as e:
            raise StillReleased(f"{e}{LOST_IN_AUDIT}") from e
        if not isinstance(msg, Audited):
            raise StillReleased(f"the destination sent {msg.KIND!r}{LOST_IN_AUDIT}")
        return msg


def _refused(what: str, msg: ReplyMessage) -> MigrationError:
    """Why the destination said no: its error, or what it sent instead of the answer."""
    if isinstance(msg, Failed):
        return DestinationRefused(f"{what}: {msg.error}", msg.verify)
    return MigrationError(f"{what}: it sent {msg.KIND!r}")


__all__ = [
    "AUDITED_TIMEOUT_S",
    "READY_TIMEOUT_S",
    "RESUMED_TIMEOUT_S",
    "SETUP_TIMEOUT_S",
    "DestinationRefused",
    "Handover",
    "StillReleased",
]
