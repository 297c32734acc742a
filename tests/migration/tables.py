"""What the table tests of both machines (source and receiver) share: the shortest way
to each state, a walk put there, and the checks every table must pass."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import TypeVar

import pytest

from vmferry.errors import MigrationError
from vmferry.migration.status import MigrationStatus
from vmferry.migration.table import Step, UnexpectedEvent, Walk

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)
A = TypeVar("A", bound=enum.Enum)
W = TypeVar("W", bound=Walk)  # type: ignore[type-arg]


def shortest_paths(table: Mapping[tuple[S, E], Step[S, A]], start: S) -> dict[S, list[E]]:
    """The shortest event sequence from ``start`` to each state the table reaches."""
    paths: dict[S, list[E]] = {start: []}
    todo = deque([start])
    while todo:
        state = todo.popleft()
        for (s, e), step in table.items():
            if s is state and step.next not in paths:
                paths[step.next] = [*paths[state], e]
                todo.append(step.next)
    return paths


def put_at(m: W, path: list[E]) -> W:
    """``m`` walked along ``path``."""
    for e in path:
        m.step(e)
    return m


def steps(m: Walk[S, E, A], *events: E) -> list[A]:
    """The actions of stepping ``events`` in turn."""
    out: list[A] = []
    for e in events:
        out += m.step(e)
    return out


def assert_steps_as_the_table_says(
    m: Walk[S, E, A],
    table: Mapping[tuple[S, E], Step[S, A]],
    statuses: Mapping[S, MigrationStatus],
    event: E,
) -> None:
    """``event`` in ``m``'s state: the table's step, or refused naming both, changing nothing."""
    state = m.state
    step = table.get((state, event))
    if step is None:
        assert not m.allows(event)
        with pytest.raises(UnexpectedEvent) as err:
            m.step(event)
        assert err.value.state is state and err.value.event is event
        assert f"event {event.name} is not expected in state {state.name}" in str(err.value)
        assert isinstance(err.value, MigrationError)
        assert m.state is state  # a refused event changes nothing
    else:
        assert m.allows(event)
        assert m.step(event) == step.actions
        assert m.state is step.next
        assert m.history[-1] == (state, event)
        assert m.status is statuses[step.next]


def assert_each_state_can_end(
    table: Mapping[tuple[S, E], Step[S, A]], states: AbstractSet[S], final: AbstractSet[S]
) -> None:
    """The table stays within ``states``, and from each of them a final state is reached."""
    assert {s for s, _ in table} | {step.next for step in table.values()} <= states
    for state in states - final:
        seen, todo = {state}, [state]
        while todo:
            cur = todo.pop()
            for (s, _), step in table.items():
                if s is cur and step.next not in seen:
                    seen.add(step.next)
                    todo.append(step.next)
        assert seen & final, f"{state.name} never ends"
