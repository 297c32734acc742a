"""The destination's answers on the reply path: ``accepted`` after the CONF, ``ready``
after END, and — once the source said ``go`` — ``resumed``.

Each wait ends in the answer, a ``DestinationRefused`` (it said ``failed``, or sent
something else), or the watch's PeerSilent/PeerClosed; the driver turns which into the
source table's event.
"""

from __future__ import annotations

from typing import Any

from vmferry.errors import MigrationError
from vmferry.migration.channel import ReplyPath
from vmferry.migration.codec import Accepted, Failed, Go, Ready, ReplyMessage, Resumed
from vmferry.migration.liveness import PeerWatch

SETUP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 120.0  # destination loads the last data and verifies
RESUMED_TIMEOUT_S = 30.0


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


def _refused(what: str, msg: ReplyMessage) -> MigrationError:
    """Why the destination said no: its error, or what it sent instead of the answer."""
    if isinstance(msg, Failed):
        return DestinationRefused(f"{what}: {msg.error}", msg.verify)
    return MigrationError(f"{what}: it sent {msg.KIND!r}")


__all__ = [
    "READY_TIMEOUT_S",
    "RESUMED_TIMEOUT_S",
    "SETUP_TIMEOUT_S",
    "DestinationRefused",
    "Handover",
    "StillReleased",
]
