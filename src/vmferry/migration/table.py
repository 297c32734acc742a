"""State machines written as tables, and the walk that follows one.

A table maps (state, event) to a ``Step``: the next state and the actions a driver
carries out, in order. A pair missing from the table is an event that state does not
expect: ``Walk.step`` raises ``UnexpectedEvent`` naming both and the last steps taken.
Nothing here does I/O or keeps time; the driver (sockets, KVM, threads) turns what it
sees into events and performs the actions it gets back. The walk is not thread-safe: a
driver whose events come from several threads serialises its ``step`` calls.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Generic, TypeVar

from vmferry.errors import MigrationError
from vmferry.migration.status import MigrationStatus

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)
A = TypeVar("A", bound=enum.Enum)

HISTORY_SHOWN = 6  # steps an UnexpectedEvent names: enough to see the path, not a log


@dataclass(frozen=True)
class Step(Generic[S, A]):
    """Where an event leads and what the driver does on the way, in order."""

    next: S
    actions: tuple[A, ...] = ()


class UnexpectedEvent(MigrationError):
    """An event the machine's current state has no row for."""

    def __init__(
        self,
        machine: str,
        state: enum.Enum,
        event: enum.Enum,
        history: tuple[tuple[enum.Enum, enum.Enum], ...] = (),
    ) -> None:
        self.machine = machine
        self.state = state
        self.event = event
        self.history = history
        msg = f"{machine}: event {event.name} is not expected in state {state.name}"
        if history:
            shown = history[-HISTORY_SHOWN:]
            trail = ", ".join(f"{s.name}+{e.name}" for s, e in shown)
            more = "…, " if len(history) > len(shown) else ""
            msg += f" (after {more}{trail})"
        super().__init__(msg)


class Walk(Generic[S, E, A]):
    """One run through a table: the current state, its status, the steps taken.

    ``final`` are the states a walk ends in; ``phases`` name states in words for error
    messages ("during the switchover"), the others by their lower-cased name."""

    def __init__(
        self,
        name: str,
        table: Mapping[tuple[S, E], Step[S, A]],
        statuses: Mapping[S, MigrationStatus],
        start: S,
        *,
        final: AbstractSet[S] = frozenset(),
        phases: Mapping[S, str] | None = None,
    ) -> None:
        self.name = name  # "source" / "receiver", for error messages
        self.table = table
        self.statuses = statuses
        self.final = final
        self.phases: Mapping[S, str] = phases or {}
        self._state = start
        self._history: list[tuple[S, E]] = []

    @property
    def state(self) -> S:
        return self._state

    @property
    def status(self) -> MigrationStatus:
        """What query-migrate shows in the current state."""
        return self.statuses[self._state]

    @property
    def finished(self) -> bool:
        """The walk is in one of its final states."""
        return self._state in self.final

    @property
    def phase(self) -> str:
        """Where the walk is, in words."""
        return self.phases.get(self._state, self._state.name.lower())

    @property
    def history(self) -> tuple[tuple[S, E], ...]:
        """Every (state, event) stepped so far, oldest first."""
        return tuple(self._history)

    def allows(self, event: E) -> bool:
        return (self._state, event) in self.table

    def step(self, event: E) -> tuple[A, ...]:
        """Take ``event``: move to the next state and return the actions to carry out."""
        step = self.table.get((self._state, event))
        if step is None:
            raise UnexpectedEvent(self.name, self._state, event, self.history)
        self._history.append((self._state, event))
        self._state = step.next
        return step.actions


__all__ = ["Step", "UnexpectedEvent", "Walk"]
