"""The source's verification status through x-verify on's phases: pending from the
pre-resume check until the audit's verdict, then passed (the audit's pages checked),
failed, or unaudited when the destination was lost before it answered."""

from __future__ import annotations

from typing import Any

import pytest

from vmferry.migration.codec import Audited, Ready
from vmferry.migration.figures import LiveFigures
from vmferry.migration.handover import StillReleased
from vmferry.migration.source_machine import SourceEvent
from vmferry.migration.source_verify import SourceVerification


class FakeHand:
    def __init__(self, verdict: Audited | None) -> None:
        self.verdict = verdict

    def await_audited(self) -> Audited:
        if self.verdict is None:
            raise StillReleased("the destination was lost; the VM stays paused here")
        return self.verdict


def _after_ready(mode: str) -> tuple[SourceVerification, LiveFigures]:
    figures = LiveFigures(1 << 30)
    sv = SourceVerification(mode, figures)
    sv.phase("pre-resume")
    sv.ready(Ready(1.5, 120, "passed"), 2.0)
    return sv, figures


def test_mode_on_is_pending_until_the_audit_passed() -> None:
    sv, figures = _after_ready("on")
    v = figures.stats.verify
    assert v.status == "pending" and v.pages_checked == 120
    assert v.phases["pre-resume"] == {"pages": 120, "ms": 2.0, "drain_ms": 0.0, "status": "passed"}
    event = sv.audited(FakeHand(Audited("passed", 262_144, 80.0, [], "")))  # type: ignore[arg-type]
    assert event is SourceEvent.AUDIT_PASSED
    assert v.status == "passed" and v.pages_checked == 262_144 and v.phase == "passed"


def test_mode_on_lost_before_the_verdict_is_unaudited() -> None:
    sv, figures = _after_ready("on")
    with pytest.raises(StillReleased):
        sv.audited(FakeHand(None))  # type: ignore[arg-type]
    v = figures.stats.verify
    assert v.status == "unaudited" and v.phase == "unaudited"
    assert v.phases["audit"]["status"] == "unfinished"


def test_mode_on_a_failed_audit_is_failed() -> None:
    sv, figures = _after_ready("on")
    verdict: Any = Audited("failed", 262_144, 80.0, [7], "guest RAM differs in pages 7")
    assert sv.audited(FakeHand(verdict)) is SourceEvent.AUDIT_FAILED  # type: ignore[arg-type]
    v = figures.stats.verify
    assert v.status == "failed" and v.mismatched_pages == [7]


def test_mode_strict_passes_at_the_pre_resume_check() -> None:
    _, figures = _after_ready("strict")
    assert figures.stats.verify.status == "passed" and figures.stats.verify.phase == "passed"
