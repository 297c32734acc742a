"""One migration of a ``vmferry bench postcopy`` case, driven over QMP the same way for
both VMMs: wait for the guest to be warm, time its speed, ``migrate``, ask for
post-copy when the case says, poll ``query-migrate`` until the end, time the guest
again after it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmferry.bench.postcopy_plan import POLL_S, WARM_TIMEOUT_S, Case, PostcopyPlan
from vmferry.bench.postcopy_progress import SerialTail
from vmferry.errors import VmferryError
from vmferry.qmp.backend import QmpError
from vmferry.qmp.client import QmpClient

DONE = ("completed", "failed", "cancelled")
POSTCOPY_STATES = ("postcopy-active", "postcopy-paused", "postcopy-recover")
# Past its timeout a migration already in post-copy cannot be cancelled (the VM runs on
# the destination): it gets this much longer, then the run is given up as an error.
POSTCOPY_GRACE_S = 60.0


class Refused(VmferryError):
    """A VMM refused what the case needs (a capability, migrate-start-postcopy): the case
    is skipped with this reason, not counted as a failed run."""


@dataclass
class Timeline:
    """Host monotonic times of one run, and what query-migrate said along the way."""

    before: float = math.nan  # start of the guest's "before" window
    start: float = math.nan  # `migrate` issued
    end: float = math.nan  # the end seen (completed, failed, cancelled)
    after: float = math.nan  # end of the "after" window
    postcopy_asked: float = math.nan  # migrate-start-postcopy issued
    postcopy_seen: float = math.nan  # first poll in a post-copy state
    last: dict[str, Any] = field(default_factory=dict)  # the last query-migrate
    polls: list[dict[str, Any]] = field(default_factory=list)  # every query-migrate
    max_throttle: int = 0
    error: str = ""

    @property
    def status(self) -> str:
        return str(self.last.get("status", "?"))

    @property
    def switch_ms(self) -> float:
        """migrate → first seen in post-copy (within a poll)."""
        return (self.postcopy_seen - self.start) * 1e3


def warm_up(tail: SerialTail, plan: PostcopyPlan, alive: Callable[[], bool]) -> None:
    """Wait until the guest has filled its working set and rewritten it once: from then
    on it runs at its steady speed."""
    deadline = time.monotonic() + WARM_TIMEOUT_S
    while tail.pages() < 2 * plan.wss_pages:
        if not alive():
            raise VmferryError("the source VM ended before the migration")
        if time.monotonic() > deadline:
            raise VmferryError(
                f"the guest had rewritten {tail.pages()} of {2 * plan.wss_pages} pages after "
                f"{WARM_TIMEOUT_S:.0f} s (no PROGRESS lines?)"
            )
        time.sleep(POLL_S)


def _start_postcopy(src: QmpClient, vmm: str) -> None:
    try:
        src.execute("migrate-start-postcopy")
    except QmpError as e:
        raise Refused(f"{vmm} refused migrate-start-postcopy: {e}") from None


def migrate(
    src: QmpClient,
    uri: str,
    tail: SerialTail,
    plan: PostcopyPlan,
    case: Case,
    postcopy_due: Callable[[dict[str, Any]], bool],
) -> Timeline:
    """Run the migration (the guest warm, the VMMs configured, the destination waiting).

    ``postcopy_due(query_migrate)`` says when to issue migrate-start-postcopy (post-copy
    cases only). A pre-copy migration still running at the case's timeout is cancelled
    and reported as not converged."""
    tl = Timeline()
    tl.before = time.monotonic()
    time.sleep(plan.before_s)
    tl.start = time.monotonic()
    src.execute("migrate", uri=uri)
    deadline = tl.start + plan.timeout_s(case)
    extended = False  # past the timeout: cancelled, or given its grace in post-copy
    while True:
        info = src.execute("query-migrate")
        now = time.monotonic()
        tl.last = info
        tl.polls.append(info)
        status = str(info.get("status", "?"))
        tl.max_throttle = max(tl.max_throttle, int(info.get("cpu-throttle-percentage", 0)))
        if status in POSTCOPY_STATES and math.isnan(tl.postcopy_seen):
            tl.postcopy_seen = now
        if status in DONE:
            tl.end = now
            break
        if case.postcopy and math.isnan(tl.postcopy_asked) and postcopy_due(info):
            _start_postcopy(src, case.vmm)
            tl.postcopy_asked = time.monotonic()
        if now > deadline:
            if extended:
                raise VmferryError(f"the migration did not end ({status}): {tl.error}")
            extended = True
            deadline = now + POSTCOPY_GRACE_S
            if status in POSTCOPY_STATES:
                tl.error = f"post-copy not done within {plan.timeout_s(case):.0f} s"
            else:
                src.execute("migrate_cancel")
                tl.error = f"not converged within {plan.timeout_s(case):.0f} s"
        time.sleep(POLL_S)
    time.sleep(max(0.0, tl.end + plan.after_s - time.monotonic()))
    tl.after = time.monotonic()
    return tl


__all__ = ["DONE", "Refused", "Timeline", "migrate", "warm_up"]
