"""The destination's side of a failed audit (x-verify on), without a VM: the guest stops
at the first mismatching chunk, the rest is still read, and a stopped VM the source may
not have heard about is kept (not discarded), its state said in one line."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from vmferry.errors import MigrationError
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration import audit_side
from vmferry.migration.audit import source_chunks
from vmferry.migration.channel import PeerClosed
from vmferry.migration.codec import Audit, Audited
from vmferry.migration.landing import LandingDigests
from vmferry.migration.metrics import VerifyResult
from vmferry.migration.receiver_machine import ReceiverEvent

NPAGES = 2048
CHUNK = 512


class FakeMachine:
    def __init__(self, reply: FakeReply, fail: bool = False) -> None:
        self.reply, self.fail = reply, fail
        self.devices: list[Any] = []
        self.paused_after: int | None = None  # chunks read when the guest was paused

    def pause(self) -> None:
        if self.fail:
            raise MigrationError("KVM_RUN would not stop")
        self.paused_after = self.reply.chunks_read


class FakeReply:
    def __init__(self, lines: Iterator[tuple[Any, bytes]], send_fails: bool = False) -> None:
        self.lines, self.send_fails = lines, send_fails
        self.chunks_read, self.sent = 0, list[Any]()
        self._body = b""

    def receive(self, timeout: float, waiting_for: str) -> Any:
        msg, self._body = next(self.lines)
        if isinstance(msg, Exception):
            raise msg
        return msg

    def receive_body(self, n: int, timeout: float, waiting_for: str) -> bytes:
        self.chunks_read += 1
        return self._body

    def send(self, msg: Any) -> None:
        if self.send_fails:
            raise BrokenPipeError(32, "Broken pipe")
        self.sent.append(msg)


class FakeReception:
    def __init__(self, reply: FakeReply, landing: LandingDigests, stop_fails: bool = False):
        self.conn = type("Conn", (), {"reply": reply})()
        self.loaded = type("Loaded", (), {"landing": landing, "memory": landing.memory})()
        self.machine = FakeMachine(reply, stop_fails)
        self.timeout_s, self.running = 5.0, True
        self.verify = VerifyResult(status="pending", mode="on")
        self.audit: Any = None
        self.keep_stopped = self.stop_failed = ""
        self.keep_vm = False
        self.error: BaseException | None = None
        self.cause: BaseException | None = None
        self.failed_check: Any = None
        self.postcopy: Any = None  # a pre-copy migration's audit

    def _fail(self, e: BaseException) -> None:
        self.cause = self.error = e


@pytest.fixture
def memories() -> Iterator[tuple[GuestMemory, LandingDigests]]:
    src, dst = GuestMemory(NPAGES * 4096), GuestMemory(NPAGES * 4096)
    src.pages()[100] = 5  # never arrived: the first chunk mismatches
    landing = LandingDigests(dst, seed=3)
    yield src, landing
    landing.close()
    src.close()
    dst.close()


def _lines(src: GuestMemory, lost_at: int | None = None) -> Iterator[tuple[Any, bytes]]:
    for i, (chunk, _) in enumerate(source_chunks(src, 3, CHUNK)):
        if i == lost_at:
            yield PeerClosed("the source closed the connection in an audit chunk"), b""
        body = chunk.encode(NPAGES)
        yield Audit(len(body)), body


def _audit(r: FakeReception) -> ReceiverEvent:
    event = audit_side.await_audit(r)  # type: ignore[arg-type]
    audit_side.stop_vm(r)  # type: ignore[arg-type]  # the table's _STOP: once only
    audit_side.send_audited(r)  # type: ignore[arg-type]
    return event


def test_the_guest_stops_at_the_first_bad_chunk_and_the_rest_is_read(memories: Any) -> None:
    src, landing = memories
    r = FakeReception(FakeReply(_lines(src)), landing)
    assert _audit(r) is ReceiverEvent.AUDIT_FAILED
    assert r.machine.paused_after == 1 and r.conn.reply.chunks_read == NPAGES // CHUNK
    (verdict,) = r.conn.reply.sent
    assert isinstance(verdict, Audited) and verdict.status == "failed"
    assert verdict.mismatched_pages == [100] and not r.keep_vm  # told: it may go


def test_after_postcopy_the_failure_says_the_source_does_not_run_it_again(
    memories: Any,
) -> None:
    src, landing = memories
    r = FakeReception(FakeReply(_lines(src)), landing)
    r.postcopy = object()  # the guest ran here since the switch
    assert _audit(r) is ReceiverEvent.AUDIT_FAILED
    assert str(r.cause).startswith("verification failed after post-copy: ")
    assert str(r.cause).endswith(
        "; the guest was stopped here; the source keeps its paused copy from the switch, "
        "which has not run since"
    )


def test_a_verdict_that_cannot_be_sent_keeps_the_stopped_vm(memories: Any) -> None:
    src, landing = memories
    r = FakeReception(FakeReply(_lines(src), send_fails=True), landing)
    assert _audit(r) is ReceiverEvent.AUDIT_FAILED
    assert r.keep_vm and "\n" not in str(r.error)
    assert str(r.error).startswith("verification failed after resume (guest RAM differs")
    assert "the VM is kept here stopped (vCPUs paused, devices stopped), not discarded: " in str(
        r.error
    )
    assert "the source could not be told ([Errno 32] Broken pipe)" in str(r.error)


def test_a_source_lost_after_a_mismatch_still_fails_and_keeps_the_vm(memories: Any) -> None:
    src, landing = memories
    r = FakeReception(FakeReply(_lines(src, lost_at=2)), landing)
    assert _audit(r) is ReceiverEvent.AUDIT_FAILED  # not "runs on unaudited"
    assert r.machine.paused_after == 1 and r.keep_vm
    assert "could not be read to its end after a mismatch (the source closed" in str(r.error)


def test_a_vm_that_would_not_stop_is_not_reported_failed_to_the_source(memories: Any) -> None:
    src, landing = memories
    r = FakeReception(FakeReply(_lines(src)), landing, stop_fails=True)
    assert _audit(r) is ReceiverEvent.AUDIT_FAILED
    assert r.conn.reply.sent == [] and r.keep_vm  # the source keeps its copy paused
    assert "could not be stopped (KVM_RUN would not stop)" in str(r.error)
    assert "it may be running" in str(r.error)


def test_a_passed_audit_leaves_the_guest_running(memories: Any) -> None:
    src, landing = memories
    src.pages()[100] = 0
    r = FakeReception(FakeReply(_lines(src)), landing)
    assert audit_side.await_audit(r) is ReceiverEvent.AUDIT_PASSED  # type: ignore[arg-type]
    assert r.running and r.machine.paused_after is None
    assert r.verify.status == "passed" and r.verify.pages_checked == NPAGES
    assert r.loaded.landing is None and landing.digests.size == 0  # freed after the verdict
