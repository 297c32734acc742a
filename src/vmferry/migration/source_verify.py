"""The source's side of verification: which mode, where it is (query-migrate's
x-verify-phase), each phase's figures, and the audit after resume (x-verify on).

The audit runs once the destination said ``resumed``: RAM here is frozen (the VM never
runs here again unless the audit fails), so its digests are those of what was sent. A
verdict of ``failed`` means the destination stopped its guest: the table rolls back,
except after post-copy (the guest ran there since the switch: it stays paused here).

Status (query-migrate's verify.status): x-verify on is "pending" from the pre-resume
check until the audit passed ("passed", its pages then the pages checked), "failed" if it
did not, "unaudited" if the destination was lost before its verdict came.
"""

from __future__ import annotations

import time

from vmferry.machine.machine import Machine
from vmferry.migration.audit import source_chunks
from vmferry.migration.codec import Ready
from vmferry.migration.figures import LiveFigures
from vmferry.migration.handover import Handover, StillReleased
from vmferry.migration.source_machine import SourceEvent

Ev = SourceEvent


def postcopy_audit_failed(pages: list[int]) -> str:
    """The line for a failed audit after post-copy (the VM stays paused here)."""
    shown = ", ".join(str(p) for p in pages[:8]) + (", …" if len(pages) > 8 else "")
    if len(pages) == 1:
        which = f"page {shown} differs"
    else:
        which = f"pages {shown} differ" if pages else "pages differ (none named)"
    return (
        f"verification failed after post-copy: {which}; the destination stopped the VM; "
        "the source keeps its paused copy from the switch, which has not run since"
    )


class SourceVerification:
    """One migration's verification, as the source sees it."""

    def __init__(self, mode: str, figures: LiveFigures) -> None:
        self.mode = mode  # on | strict | off (a file target is never "on")
        self.figures = figures
        self._t0 = 0.0
        self._source_ms = 0.0
        with figures.lock:
            figures.stats.verify.mode = mode

    def phase(self, phase: str) -> None:
        if self.mode != "off":
            with self.figures.lock:
                self.figures.stats.verify.phase = phase

    def ready(self, msg: Ready, pre_resume_ms: float) -> None:
        """The destination's pre-resume check passed (``pre_resume_ms``: both sides')."""
        if self.mode == "off":
            return
        self.figures.verify_passed(msg.pages_checked)
        phase = {
            "pages": msg.pages_checked,
            "ms": round(pre_resume_ms, 3),
            "drain_ms": round(msg.drain_ms, 3),  # the destination's landing digests, of ms
            "status": msg.verify,
        }
        with self.figures.lock:
            v = self.figures.stats.verify
            if self.mode == "on":
                v.status = "pending"  # what the dirty log vouches for is not yet audited
            v.phases["pre-resume"] = phase
            if self.mode == "strict":
                v.phase = msg.verify

    def resumed_event(self) -> SourceEvent:
        return Ev.RESUMED_UNAUDITED if self.mode == "on" else Ev.RESUMED

    def send_audit(self, hand: Handover, machine: Machine, seed: int) -> None:
        """All resident RAM, digested on two threads and sent chunk by chunk."""
        self._t0 = time.monotonic()
        self.phase("audit")
        mem = machine.memory
        try:
            self._source_ms = hand.send_audit(source_chunks(mem, seed), mem.npages)
        except StillReleased:
            self._unaudited()
            raise

    def audited(self, hand: Handover) -> SourceEvent:
        """The destination's verdict, as the table's event; a failure in words."""
        try:
            msg = hand.await_audited()
        except StillReleased:
            self._unaudited()
            raise
        phase = {
            "pages": msg.pages_checked,
            "ms": round((time.monotonic() - self._t0) * 1e3, 3),
            "source_ms": round(self._source_ms, 3),
            "status": msg.status,
        }
        with self.figures.lock:
            v = self.figures.stats.verify
            v.phases["audit"] = phase
            v.phase = msg.status
            cpu = v.cpu_state
            if msg.status == "passed":
                v.status, v.pages_checked = "passed", msg.pages_checked
        if msg.status == "passed":
            return Ev.AUDIT_PASSED
        shown = ", ".join(str(p) for p in msg.mismatched_pages[:8]) or "none named"
        self.figures.verify_failed({**vars(msg), "cpu_state": cpu})
        if self.figures.stats.postcopy.active:  # it ran there: never here again
            self.figures.failed(postcopy_audit_failed(msg.mismatched_pages))
        else:
            self.figures.failed(f"verification failed after resume; rolled back: pages {shown}")
        return Ev.AUDIT_FAILED

    def _unaudited(self) -> None:
        """The destination was lost before its verdict: what it runs was not audited."""
        with self.figures.lock:
            v = self.figures.stats.verify
            v.status = v.phase = "unaudited"
            v.phases["audit"] = {
                "pages": 0,
                "ms": round((time.monotonic() - self._t0) * 1e3, 3),
                "source_ms": round(self._source_ms, 3),
                "status": "unfinished",
            }


__all__ = ["SourceVerification"]
