"""When a migration may switch to post-copy, and the switch's decision at a round's end.

``refusal`` is migrate-start-postcopy's check (QEMU's names and order): the capability
first, then where the migration is. ``decision`` turns the policy's verdict at a round's
end into "postcopy" when the switch was asked for (whatever the verdict, as QEMU) or is
due by x-postcopy-after (a migration that converged still finishes by pre-copy then;
one that would give up switches instead). Pure functions; the source's driver asks them.
"""

from __future__ import annotations

from vmferry.migration.postcopy_policy import (
    parse_postcopy_after,
    postcopy_due,
    postcopy_reason,
)
from vmferry.migration.source_machine import FINAL, POSTCOPY, SourceState

St = SourceState
CANCELLING = frozenset({St.CANCELLING_NO_PEER, St.CANCELLING, St.CANCELLING_AFTER_END})
_WHO = "migrate-start-postcopy"
# Where the switch can still be asked for: before the rounds or during them.
_BEFORE_SWITCH = frozenset({St.SETUP, St.AWAIT_ACCEPTED, St.PRECOPY})


def refusal(
    state: SourceState,
    *,
    postcopy_ram: bool,
    live: bool,
    verify_mode: str,
    requested: bool,
) -> str | None:
    """Why post-copy cannot be started now (one line), or None if it can."""
    if not postcopy_ram:
        return f"{_WHO}: the postcopy-ram capability is not set"
    if not live:
        return f"{_WHO}: a migration to a file cannot switch to post-copy"
    if verify_mode == "strict":
        return (
            f"{_WHO}: x-verify strict checks all of RAM before the resume, which post-copy "
            "sends after it: use x-verify on (the audit after the last page) or off"
        )
    if state is St.IDLE:
        return f"{_WHO}: the migration has not been started"
    if requested or state in POSTCOPY:
        return f"{_WHO}: the migration is already in post-copy"
    if state in CANCELLING:
        return f"{_WHO}: the migration is being cancelled"
    if state is St.COMPLETED:
        return f"{_WHO}: the migration has already completed"
    if state in FINAL:
        return f"{_WHO}: the migration has already {_ended(state)}"
    if state not in _BEFORE_SWITCH:
        return f"{_WHO}: the migration is already switching over (pre-copy finishes it)"
    return None


def _ended(state: SourceState) -> str:
    return "been cancelled" if state is St.CANCELLED else "failed"


def decision(action: str, *, requested: bool, due: bool) -> str:
    """The round's event name. Asked for, the switch comes at this round's end whatever
    the policy said (as QEMU's migrate-start-postcopy does); due by x-postcopy-after it
    replaces only going on or giving up: a converged round switches over by pre-copy."""
    if requested or (due and action in ("continue", "cancel")):
        return "postcopy"
    return action


#: What the destination's ``accepted`` said it lacks follows.
CANNOT_THERE = "the destination cannot do post-copy: "
#: x-postcopy-after with x-verify strict: refused at migrate, not silently ignored.
STRICT_AFTER = (
    "x-postcopy-after {!r} cannot apply with x-verify strict (strict checks all of RAM "
    "before the resume, which post-copy sends after it): use x-verify on or off, or "
    "unset x-postcopy-after"
)
NO_PAUSE = (
    "pausing a healthy link is not built yet: a link that is reset or goes silent after "
    "the switch pauses post-copy by itself (then migrate-recover and migrate resume)"
)


class SwitchWish:
    """Whether one migration wants the switch at a round's end: asked for by
    migrate-start-postcopy, or due by x-postcopy-after (only where post-copy is allowed:
    postcopy-ram, a live target, no x-verify strict)."""

    def __init__(self, postcopy_after: str, *, allowed: bool) -> None:
        self.after = parse_postcopy_after(postcopy_after)
        self.allowed = allowed
        self.requested = False

    def decide(self, action: str, rounds_done: int, elapsed_s: float) -> str:
        """The round's event name for the policy's ``action`` (see ``decision``)."""
        if not self.allowed:
            return action
        due = postcopy_due(self.after, rounds_done, elapsed_s)
        return decision(action, requested=self.requested, due=due)

    def reason(self, rounds_done: int, elapsed_s: float) -> str:
        """Why it switched (stats.convergence)."""
        return postcopy_reason(self.after, rounds_done, elapsed_s)


__all__ = ["CANNOT_THERE", "NO_PAUSE", "STRICT_AFTER", "SwitchWish", "decision", "refusal"]
