"""The source's migration thread: carry out a step's actions, step the walk with the
event they ended in, and again, until a final state.

A cancel comes from another thread: steps are taken under the stats lock, and between
two actions the loop looks whether the walk moved to a cancelling state (then the step
stops there: HALTED). An error an action raises is classified (failure.py) into the
event the table has a row for; the table having no row at all is a driver bug, which
fails the migration safely: rolled back unless the VM was already handed over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from vmferry.errors import MigrationCancelled
from vmferry.migration.failure import Circumstances, classify, describe
from vmferry.migration.figures import LiveFigures
from vmferry.migration.source_machine import (
    SourceAction,
    SourceEvent,
    SourceMachine,
    SourceState,
)
from vmferry.migration.status import MigrationStatus
from vmferry.migration.switchover import EventSink
from vmferry.migration.table import UnexpectedEvent

log = logging.getLogger(__name__)

Perform = Callable[[], SourceEvent | None]


class SourceLoop:
    """Drives a source walk: its actions' I/O turned into the next event."""

    def __init__(
        self,
        walk: SourceMachine,
        figures: LiveFigures,
        perform: Mapping[SourceAction, Perform],
        *,
        circumstances: Callable[[], Circumstances],
        cancel_reason: Callable[[], str],
        rollback: Callable[[], None],
        on_event: EventSink,
    ) -> None:
        self.walk = walk
        self.figures = figures
        self.perform = perform
        self.circumstances = circumstances
        self.cancel_reason = cancel_reason
        self.rollback = rollback
        self.on_event = on_event

    def run(self, actions: tuple[SourceAction, ...], state: SourceState) -> None:
        """From the step that left the walk in ``state`` with ``actions`` to do, to the end."""
        while True:
            event = self.carry_out(actions, state)
            if event is None:
                return  # a final state: nothing more to wait for
            try:
                with self.figures.lock:  # a cancel steps from another thread
                    actions, state = self.walk.step(event), self.walk.state
            except UnexpectedEvent as e:
                self.unexpected(e)
                return
            if state is SourceState.CANCELLED and not self.figures.stats.error:
                # The step in flight ended well, but a cancel had come meanwhile.
                self.figures.failed(self.cancel_reason())

    def carry_out(
        self, actions: tuple[SourceAction, ...], state: SourceState
    ) -> SourceEvent | None:
        """Perform the actions of one step; the event the last one yielded (None after a
        final step). A cancel between two actions stops the step there (HALTED)."""
        for action in actions:
            if self.walk.state is not state and self.walk.cancelling:
                return self.failed(MigrationCancelled(self.cancel_reason()))
            try:
                event = self.perform[action]()
            except BaseException as e:  # what it comes to is the table's to say
                if self.walk.finished:
                    # A final step (rollback, telling why): the rest of it still runs.
                    log.warning("%s: %s failed: %r", self.walk.name, action.name, e)
                    continue
                return self.failed(e)
            if event is not None:
                return event
        return None

    def failed(self, e: BaseException) -> SourceEvent:
        """Keep the failure in the figures, in words; the event it comes to."""
        c = self.circumstances()
        self.figures.failed(describe(e, c))
        return classify(e, c)

    def unexpected(self, e: UnexpectedEvent) -> None:
        """The table has no row for what happened (a driver bug): fail safe."""
        log.error("%s", e)
        self.figures.failed(f"internal error: {e}")
        if not self.walk.released:
            self.rollback()
        with self.figures.lock:
            self.figures.stats.status = MigrationStatus.FAILED
        self.on_event("MIGRATION", {"status": MigrationStatus.FAILED})


__all__ = ["Perform", "SourceLoop"]
