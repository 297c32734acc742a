"""Views of MigrationStats: QEMU's ``query-migrate`` reply and vmferry's full JSON report.

Field names and types are QEMU's (``qapi/migration.json``): times are whole milliseconds,
counters whole bytes or pages, ``mbps`` a number. vmferry adds the downtime breakdown
(ms, fractional), the rounds (seconds, bytes, bytes/s), the verification, post-copy's
figures and the parameters the migration ran with.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Final

from vmferry.migration.metrics import (
    DowntimeBreakdown,
    MigrationStats,
    PostcopyFigures,
    RoundRecord,
    VerifyResult,
)
from vmferry.migration.params import MigrationCapabilities, MigrationParameters, verify_mode

PAGE_SIZE: Final = 4096
# States in which QEMU's query-migrate fills in times and ram (fill_source_migration_info).
_RUNNING: Final = frozenset(
    {
        "active",
        "cancelling",
        "pre-switchover",
        "device",
        "wait-unplug",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
    }
)
# States in which the measured downtime is reported instead of the expected one. QEMU
# says expected-downtime again once post-copy is paused; vmferry keeps the downtime the
# switch took (it is over and measured).
_DOWNTIME_KNOWN: Final = frozenset(
    {"completed", "postcopy-active", "postcopy-paused", "postcopy-recover"}
)
# QEMU 7.2 answers only status and error-desc once a migration failed or was cancelled;
# vmferry keeps every figure, as it stood when the migration ended (a client asking why
# it failed wants to see how far it got).
_ENDED: Final = frozenset({"failed", "cancelled"})


def _ms(value: float) -> int:
    """Whole ms as QEMU reports them; -1 when unknown (JSON has no infinity)."""
    return round(value) if math.isfinite(value) else -1


def _num(value: float) -> float:
    return value if math.isfinite(value) else -1.0


def ram_dict(stats: MigrationStats) -> dict[str, Any]:
    """query-migrate's ``ram`` object."""
    return {
        "transferred": stats.transferred,
        "remaining": stats.remaining,
        "total": stats.total_ram,
        "duplicate": stats.duplicate,
        "normal": stats.normal,
        "normal-bytes": stats.normal * PAGE_SIZE,
        "dirty-pages-rate": _ms(stats.dirty_pages_rate),  # QEMU: an integer, pages/s
        "mbps": _num(stats.mbps),
        "dirty-sync-count": stats.dirty_sync_count,
        "precopy-bytes": stats.precopy_bytes,
        "downtime-bytes": stats.downtime_bytes,
        "postcopy-requests": stats.postcopy.requests,
        "postcopy-bytes": stats.postcopy.bytes,
        "page-size": PAGE_SIZE,
    }


def query_migrate_dict(stats: MigrationStats) -> dict[str, Any]:
    """What QEMU's ``query-migrate`` would return on the source in this state.

    As QEMU: nothing at all before any migration; times and ``ram`` while running or
    completed (and, unlike QEMU, after a failure or a cancel); ``downtime`` once known
    (after a failure: how long the VM was paused, if it was), ``expected-downtime``
    before; ``error-desc`` when an error was recorded.
    """
    if stats.status == "none":
        return {}
    out: dict[str, Any] = {"status": stats.status}
    if stats.status in _RUNNING or stats.status == "completed" or stats.status in _ENDED:
        out["setup-time"] = _ms(stats.setup_ms)
        out["total-time"] = _ms(stats.total_ms)
        paused = stats.status in _ENDED and stats.downtime_ms > 0
        if stats.status in _DOWNTIME_KNOWN or paused:
            out["downtime"] = _ms(stats.downtime_ms)
        else:
            out["expected-downtime"] = _ms(stats.expected_downtime_ms)
        out["ram"] = ram_dict(stats)
        out["vfio"] = {"transferred": stats.device_transferred}
        if stats.throttle_pct and stats.status in _RUNNING:
            out["cpu-throttle-percentage"] = stats.throttle_pct
        out.update(blocktime_dict(stats.postcopy))
    if stats.verify.phase:
        out["x-verify-phase"] = stats.verify.phase
    if stats.error:
        out["error-desc"] = stats.error
    return out


def blocktime_dict(pc: PostcopyFigures) -> dict[str, Any]:
    """query-migrate's ``postcopy-blocktime`` (ms every vCPU waited at once) and
    ``postcopy-vcpu-blocktime`` (ms, per vCPU), whole ms as QEMU's uint32s. QEMU shows
    them on the destination with the postcopy-blocktime capability; vmferry once the
    switch happened, on either side that knows them."""
    if not pc.active:
        return {}
    out: dict[str, Any] = {"postcopy-blocktime": _ms(pc.blocktime_ms)}
    if pc.vcpu_blocktime_ms:  # absent rather than an empty list where not measured
        out["postcopy-vcpu-blocktime"] = [_ms(t) for t in pc.vcpu_blocktime_ms]
    return out


def postcopy_dict(pc: PostcopyFigures) -> dict[str, Any]:
    """The report's ``postcopy``: every figure (seconds from the start, ms, pages)."""
    return {
        "active": pc.active,
        "switch-time": round(_num(pc.switch_s), 6),
        "requests": pc.requests,
        "bytes": pc.bytes,
        "urgent-pages": pc.urgent_pages,
        "pushed-pages": pc.pushed_pages,
        "owed-pages": pc.owed_pages,
        "blocktime": round(_num(pc.blocktime_ms), 3),
        "vcpu-blocktime": [round(_num(t), 3) for t in pc.vcpu_blocktime_ms],
        "latency": {k: round(_num(v), 3) for k, v in pc.latency_ms.items()},
        "recoveries": pc.recoveries,
        "complete-time": round(_num(pc.complete_s), 6),
    }


def _postcopy_from(d: dict[str, Any]) -> PostcopyFigures:
    return PostcopyFigures(
        active=bool(d.get("active", False)),
        switch_s=d.get("switch-time", 0.0),
        requests=d.get("requests", 0),
        bytes=d.get("bytes", 0),
        urgent_pages=d.get("urgent-pages", 0),
        pushed_pages=d.get("pushed-pages", 0),
        owed_pages=d.get("owed-pages", 0),
        blocktime_ms=d.get("blocktime", 0.0),
        vcpu_blocktime_ms=list(d.get("vcpu-blocktime", [])),
        latency_ms=dict(d.get("latency", {})),
        recoveries=d.get("recoveries", 0),
        complete_s=d.get("complete-time", 0.0),
    )


def _downtime_dict(stats: MigrationStats) -> dict[str, float]:
    d = stats.downtime
    parts = {
        "pause": d.pause_ms,
        "final-ram": d.final_ram_ms,
        "cpu-state": d.cpu_state_ms,
        "device-state": d.device_state_ms,
        "verify": d.verify_ms,
        "resume": d.resume_ms,
        "total": d.total_ms,
    }
    return {k: round(_num(v), 3) for k, v in parts.items()}


def _rounds_list(stats: MigrationStats) -> list[dict[str, Any]]:
    return [
        {
            "index": r.index,
            "start": round(r.start_s, 6),
            "duration": round(r.duration_s, 6),
            "pages": r.pages,
            "zero-pages": r.zero_pages,
            "bytes": r.bytes,
            "dirty-pages": r.dirty_pages,
            "dirty-rate": _num(r.dirty_rate),
            "bandwidth": _num(r.bandwidth),
            "throttle": r.throttle_pct,
            "stop-copy": r.stop_copy,
            "device-bytes": r.device_bytes,
        }
        for r in stats.rounds
    ]


NOT_REACHED: Final = "not-reached"


def verify_status(migration_status: str, status: str, x_verify: bool) -> str:
    """The verification's status as the report and the summary give it: "not-reached"
    where x-verify was on but the migration ended (failed, cancelled) before the
    switchover that runs it, rather than "off" as if it had been turned off."""
    if status == "off" and x_verify and migration_status != "completed":
        return NOT_REACHED
    return status


def report_dict(
    stats: MigrationStats, params: MigrationParameters, caps: MigrationCapabilities
) -> dict[str, Any]:
    """Everything measured, under QEMU's names where QEMU has one."""
    v = stats.verify
    out: dict[str, Any] = {
        "status": stats.status,
        "total-time": _ms(stats.total_ms),
        "downtime": _ms(stats.downtime_ms),
        "expected-downtime": _ms(stats.expected_downtime_ms),
        "setup-time": _ms(stats.setup_ms),
        "cpu-throttle-percentage": stats.throttle_pct,
        "ram": ram_dict(stats),
        "downtime-breakdown": _downtime_dict(stats),
        "rounds": _rounds_list(stats),
        "vfio": {"transferred": stats.device_transferred},
        "devices": stats.devices,
        "verify": {
            "status": verify_status(stats.status, v.status, verify_mode(params, caps) != "off"),
            "pages-checked": v.pages_checked,
            "first-mismatches": list(v.mismatched_pages),
            "cpu-state": v.cpu_state,
            "detail": v.detail,
            "mode": v.mode,
            "phases": {k: dict(p) for k, p in v.phases.items()},
        },
        "parameters": params.to_qmp(),
        "capabilities": caps.to_qmp(),
        "convergence": stats.convergence,
        "postcopy": postcopy_dict(stats.postcopy),
    }
    if stats.error:
        out["error-desc"] = stats.error
    return out


def write_report(
    path: str | os.PathLike[str],
    stats: MigrationStats,
    params: MigrationParameters,
    caps: MigrationCapabilities,
) -> None:
    """The full report as JSON (indent 2), strictly valid: no NaN or Infinity."""
    text = json.dumps(report_dict(stats, params, caps), indent=2, allow_nan=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def stats_from_report(rep: dict[str, Any]) -> MigrationStats:
    """The measured data back from a report (another process made it), e.g. to plot it."""
    d = rep.get("downtime-breakdown", {})
    v = rep.get("verify", {})
    ram = rep.get("ram", {})
    return MigrationStats(
        status=rep.get("status", "none"),
        total_ram=ram.get("total", 0),
        transferred=ram.get("transferred", 0),
        duplicate=ram.get("duplicate", 0),
        normal=ram.get("normal", 0),
        setup_ms=rep.get("setup-time", 0),
        total_ms=rep.get("total-time", 0),
        downtime_ms=rep.get("downtime", 0),
        throttle_pct=rep.get("cpu-throttle-percentage", 0),
        rounds=[
            RoundRecord(
                index=r["index"],
                start_s=r["start"],
                duration_s=r["duration"],
                pages=r["pages"],
                zero_pages=r["zero-pages"],
                bytes=r["bytes"],
                dirty_pages=r["dirty-pages"],
                dirty_rate=r["dirty-rate"],
                bandwidth=r["bandwidth"],
                throttle_pct=r["throttle"],
                stop_copy=r["stop-copy"],
                device_bytes=r.get("device-bytes", 0),
            )
            for r in rep.get("rounds", [])
        ],
        downtime=DowntimeBreakdown(
            pause_ms=d.get("pause", 0.0),
            final_ram_ms=d.get("final-ram", 0.0),
            cpu_state_ms=d.get("cpu-state", 0.0),
            device_state_ms=d.get("device-state", 0.0),
            verify_ms=d.get("verify", 0.0),
            resume_ms=d.get("resume", 0.0),
            total_ms=d.get("total", 0.0),
        ),
        verify=VerifyResult(
            status=v.get("status", "off"),
            pages_checked=v.get("pages-checked", 0),
            mismatched_pages=list(v.get("first-mismatches", [])),
            cpu_state=v.get("cpu-state", "off"),
            detail=v.get("detail", ""),
            mode=v.get("mode", "off"),
            phases={k: dict(p) for k, p in v.get("phases", {}).items()},
        ),
        device_transferred=rep.get("vfio", {}).get("transferred", 0),
        devices=list(rep.get("devices", [])),
        error=rep.get("error-desc", ""),
        convergence=rep.get("convergence", ""),
        postcopy=_postcopy_from(rep.get("postcopy", {})),
    )
