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
    """Every chunk of the source's audit, compared as it comes; the verdict's event. The
    guest stops at the first mismatching chunk; the rest is still read (and its
    mismatches counted) before the verdict. A source lost after that is no reason to run
    the guest again: the verdict stays failed (and the VM, stopped, is kept: send_audited)."""
    assert r.conn is not None and r.loaded is not None and r.loaded.landing is not None
    comp = r.audit = AuditComparison(r.loaded.landing)
    t0 = time.monotonic()
    npages = r.loaded.memory.npages
    done = False
    try:
        while not done:
            done = comp.take(_next_chunk(r, comp.next_page, npages))
            if not comp.passed and r.running:
                stop_vm(r)  # known bad: it runs no further while the rest arrives
    except Exception as e:
        if comp.passed:
            raise  # nothing found against the guest: the table decides (runs on, or stops)
        # The source may be lost: it cannot be counted on to hear the verdict.
        r.keep_stopped = f"the audit could not be read to its end after a mismatch ({e})"
    ms = (time.monotonic() - t0) * 1e3
    drop_landing(r)
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
    if r.postcopy is not None:  # it ran here since the switch: the source runs it no more
        why = (
            f"verification failed after post-copy: {comp.detail()}; the guest was stopped "
            "here; the source keeps its paused copy from the switch, which has not run since"
        )
    else:
        why = (
            f"verification failed after resume: {comp.detail()}; the guest was stopped "
            "here and runs on at the source"
        )
    r._fail(MigrationError(why))
    return Re.AUDIT_FAILED


def _next_chunk(r: Reception, due: int, npages: int) -> AuditChunk:
    assert r.conn is not None
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
    return AuditChunk.decode(body, f"audit chunk at page {due}", npages)


def send_audited(r: Reception) -> None:
    """The verdict; "failed" also for an audit that could not be read (said after the
    guest was stopped). None if the guest could not be stopped: the source would run it
    again beside this one. A failed verdict the source may not have heard keeps the
    stopped VM here (not discarded): it would run nowhere if the source never learns."""
    assert r.conn is not None
    comp = r.audit
    passed = r.error is None and comp is not None and comp.passed
    if not passed and r.stop_failed:
        _keep(
            r,
            f"could not be stopped ({r.stop_failed}), so it is kept as it is "
            "(it may be running); the source was not told and keeps its copy paused",
        )
        return
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
        if passed:
            log.warning("could not tell the source the audit's verdict: %s", e)
            return
        r.keep_stopped = r.keep_stopped or f"the source could not be told ({e})"
    if not passed and r.keep_stopped:
        _keep(
            r,
            f"is kept here stopped (vCPUs paused, devices stopped), not discarded: "
            f"{r.keep_stopped}; the source keeps its copy paused",
        )


def _keep(r: Reception, state: str) -> None:
    """The VM stays (DISCARD leaves it): its state in the one line the failure says."""
    r.keep_vm = True
    what = r.verify.detail if r.verify is not None and r.verify.detail else str(r.error)
    err = MigrationError(f"verification failed after resume ({what}); the VM {state}")
    log.error("%s", err)
    r.cause = r.cause or err
    r.error = err


def stop_vm(r: Reception) -> None:
    """The guest stops here: vCPUs first, then the devices (no more DMA or frames). Once:
    a stop that raises is kept as why the VM could not be stopped (send_audited)."""
    m = r.machine
    if m is None or not r.running:
        return
    r.running = False
    try:
        m.pause()
        DestinationDevices(m.devices).stop()
    except Exception as e:
        log.error("could not stop the VM after the audit failed: %s", e)
        r.stop_failed = str(e) or type(e).__name__


def drop_landing(r: Reception) -> None:
    """The landing digests are of no more use once the audit ended (16 MiB at 8 GiB)."""
    if r.loaded is not None and r.loaded.landing is not None:
        r.loaded.landing.release()
        r.loaded.landing = None


def keep_unaudited(r: Reception) -> None:
    """The source went away during the audit: the guest is this one, unaudited."""
    drop_landing(r)
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
