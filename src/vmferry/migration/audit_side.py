"""The destination's actions of the audit after resume (x-verify on), for ``Reception``.

The guest runs here; the source's chunks are compared with the landing digests as they
come. A mismatch (or an audit that cannot be read) stops the guest — vCPUs, then devices
— before the source is told, so the source may run it again; a source lost meanwhile
leaves the guest running here, unaudited (the source keeps its copy paused).

With x-verify-hold-output the destination's devices hold what they transmit from just
before the start until the verdict: released when it passed, dropped when it failed.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from vmferry.errors import MigrationError
from vmferry.migration.audit import AuditComparison
from vmferry.migration.channel import PeerSilent
from vmferry.migration.codec import Abandon, Audit, AuditChunk, Audited
from vmferry.migration.devices import DestinationDevices
from vmferry.migration.loader import abandoned
from vmferry.migration.receiver_machine import ReceiverEvent

if TYPE_CHECKING:
    from vmferry.migration.reception import Reception

log = logging.getLogger(__name__)
Re = ReceiverEvent


def _held(r: Reception) -> DestinationDevices | None:
    """The devices, when x-verify-hold-output asked them to hold what they send."""
    if r.machine is None or not r.head.hold_output:
        return None
    return DestinationDevices(r.machine.devices)


def hold_output(r: Reception) -> None:
    if (devices := _held(r)) is not None:
        devices.hold_output()


def release_output(r: Reception) -> None:
    if (devices := _held(r)) is not None:
        devices.release_output()


def drop_output(r: Reception) -> None:
    if (devices := _held(r)) is not None:
        devices.drop_output()


def await_audit(r: Reception) -> ReceiverEvent:
    """Every chunk of the source's audit, compared as it comes; the verdict's event."""
    assert r.conn is not None and r.loaded is not None and r.loaded.landing is not None
    comp = r.audit = AuditComparison(r.loaded.landing)
    t0 = time.monotonic()
    npages = r.loaded.memory.npages
    done = False
    while not done:
        try:
            msg = r.conn.reply.receive(r.timeout_s, "the audit")
            if isinstance(msg, Audit):
                body = r.conn.reply.receive_body(msg.bytes, r.timeout_s, "an audit chunk")
        except PeerSilent as e:
            raise TimeoutError(str(e)) from e  # the source is silent, not wrong
        if isinstance(msg, Abandon):
            raise abandoned(msg)
        if not isinstance(msg, Audit):
            raise MigrationError(f"the source sent {msg.KIND!r} during the audit")
        done = comp.take(AuditChunk.decode(body, f"audit chunk at page {comp.next_page}", npages))
    ms = (time.monotonic() - t0) * 1e3
    assert r.verify is not None
    status = "passed" if comp.passed else "failed"
    r.verify.phases["audit"] = {"pages": comp.next_page, "ms": round(ms, 3), "status": status}
    if comp.passed:
        r.verify.status, r.verify.pages_checked = "passed", comp.next_page
        return Re.AUDIT_PASSED
    r.verify.status = "failed"
    r.verify.mismatched_pages = list(comp.mismatched)
    r.verify.detail = comp.detail()
    r.failed_check = r.verify
    r._fail(
        MigrationError(
            f"verification failed after resume: {comp.detail()}; the guest was stopped "
            "here and runs on at the source"
        )
    )
    return Re.AUDIT_FAILED


def send_audited(r: Reception) -> None:
    """The verdict; "failed" also for an audit that could not be read (said after the
    guest was stopped)."""
    assert r.conn is not None
    comp = r.audit
    passed = r.error is None and comp is not None and comp.passed
    detail = "" if passed else (comp.detail() if comp and not comp.passed else str(r.error))
    ms = 0.0 if r.verify is None else float(r.verify.phases.get("audit", {}).get("ms", 0.0))
    msg = Audited(
        "passed" if passed else "failed",
        0 if comp is None else comp.next_page,
        ms,
        [] if comp is None else list(comp.mismatched),
        detail,
    )
    try:
        r.conn.reply.send(msg)
    except OSError as e:
        log.warning("could not tell the source the audit's verdict: %s", e)


def stop_vm(r: Reception) -> None:
    """The guest stops here: vCPUs first, then the devices (no more DMA or frames)."""
    m = r.machine
    if m is None:
        return
    m.pause()
    DestinationDevices(m.devices).stop()
    r.running = False


def keep_unaudited(r: Reception) -> None:
    """The source went away during the audit: the guest is this one, unaudited."""
    log.warning("the source was lost during the audit (%s): the guest runs on here", r.error)
    if r.verify is not None:
        r.verify.status = "unaudited"
        r.verify.phases["audit"] = {"pages": 0, "ms": 0.0, "status": "unfinished"}
        r.verify.detail = f"not audited: {r.error}"
    r.error = r.cause = None


__all__ = [
    "await_audit",
    "drop_output",
    "hold_output",
    "keep_unaudited",
    "release_output",
    "send_audited",
    "stop_vm",
]
