"""Migration benchmarks: vmferry's RAM copy against raw TCP, and vmferry against QEMU.

1. RAM throughput. A 2 GiB guest, booted but never run (paused), its RAM above 16 MiB
   filled from the host with incompressible data, is migrated by ``MigrationSource`` (in
   this process) to a ``vmferry run --incoming tcp:`` process, over 1 and 2 channels. Its
   round 0 rate (round 0's bytes ÷ round 0's time, from the migration's own statistics)
   is set against raw loopback TCP between two processes carrying the same number of
   bytes over as many streams into populated memory (``vmferry.bench.rawtcp``).

2. vmferry against QEMU 7.2, on the same multiboot image (memtouch), the same RAM size
   (1, 4, 8 GiB), all of it filled with the same incompressible data (``bench.fill``),
   one vCPU (QEMU starts only vCPU 0 of a multiboot image), the same guest parameters,
   over loopback with no bandwidth cap, the same downtime limit and the same channel
   count; vmferry with verification on. Both destinations are separate processes
   waiting on a port; both sources are driven over QMP; both guests must print on the
   destination the RESULT an undisturbed run prints. Each case runs each VMM ``repeats``
   times in ABBA order; the tables give medians and ranges (``migrate_results``).

What "idle" means here: the guest booted, then stopped over QMP before the migration. A
*running* idle guest is not comparable: memtouch idles by writing to vmferry's halt port,
which parks the vCPU under vmferry but is an unassigned port under QEMU, so there the
vCPU spins and takes one of the host's cores from the migration.

The vmferry source is ``python -m vmferry.bench.migrate source``: ``vmferry run IMAGE
--qmp`` plus the host-side fill, and it writes the migration report to a file before it
exits (``vmferry run`` exits the moment a migration completes, which can race a last
``x-query-migrate-report``). The migration itself is the same code (``VmController``).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.bench import fill as bench_fill
from vmferry.bench import qemu as q
from vmferry.bench import source_proc
from vmferry.bench.migrate_plan import (
    GIB,
    GUEST_END_TIMEOUT_S,
    MB,
    WORKLOADS,
    Case,
    MigratePlan,
    Progress,
    abba,
    make_plan,
    parse_sizes,
    parse_workloads,
)
from vmferry.bench.migrate_procs import free_port, vmferry_destination
from vmferry.bench.migrate_qemu import run_qemu
from vmferry.bench.migrate_results import CaseResult, ThroughputResult, VmmRun, independence
from vmferry.bench.migrate_vmferry import reference_result, run_vmferry
from vmferry.bench.rawtcp import measure as raw_tcp
from vmferry.bench.vmm import WSS_BASE, fill_random
from vmferry.errors import VmferryError
from vmferry.machine import Machine, MachineConfig
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.qmp.client import QmpProtocolError

# ---- 1) RAM throughput against raw TCP ------------------------------------------------------


def bench_throughput(
    plan: MigratePlan, workdir: Path, progress: Progress
) -> list[ThroughputResult]:
    size = plan.ram_memory
    progress(f"throughput: {size // GIB} GiB guest, RAM above 16 MiB filled from the host")
    # memtouch with the smallest job: the destination runs it to its end in a few ms.
    config = MachineConfig(memory=size, vcpus=1, image="memtouch", cmdline="wss=4K rounds=1")
    out = []
    with Machine.boot(config, serial=io.BytesIO()) as m:
        fill_random(m.memory, WSS_BASE)
        m.start(paused=True)
        m.pause()
        raw: dict[int, list[float]] = {}
        for streams in sorted({1, *plan.ram_channels}):
            progress(f"throughput: raw loopback TCP, {streams} stream(s), {plan.ram_repeat}×")
            raw[streams] = [
                raw_tcp(m.memory.view(0, m.memory.size), streams).rate
                for _ in range(plan.ram_repeat)
            ]
        for channels in plan.ram_channels:
            progress(f"throughput: vmferry migration, {channels} channel(s), {plan.ram_repeat}×")
            rates, ends, nbytes = [], [], 0
            for _ in range(plan.ram_repeat):
                st = _migrate_in_process(m, channels, workdir, plan.timeout_s(size))
                r0 = st.rounds[0]
                nbytes = r0.bytes
                rates.append(r0.bytes / r0.duration_s)
                ends.append(st.transferred / (st.total_ms / 1e3))
            out.append(
                ThroughputResult(
                    channels=channels,
                    round0_bytes=nbytes,
                    round0_rate=statistics.median(rates),
                    round0_rates=rates,
                    end_to_end_rate=statistics.median(ends),
                    raw_rate=statistics.median(raw[channels]),
                    raw_rates=raw[channels],
                    raw_one_stream_rate=statistics.median(raw[1]),
                )
            )
    return out


def _migrate_in_process(m: Machine, channels: int, workdir: Path, timeout: float) -> Any:
    port = free_port()
    with vmferry_destination(port, workdir / "throughput-dst.serial") as dst:
        params = MigrationParameters(multifd_channels=channels)
        caps = MigrationCapabilities(multifd=channels > 1)
        src = MigrationSource(m, f"tcp:127.0.0.1:{port}", params, caps)
        src.start()
        if not src.wait(timeout):
            src.cancel()
            src.wait(30)
            raise VmferryError(f"the throughput migration did not end within {timeout:.0f} s")
        if src.stats.status != "completed":
            raise VmferryError(f"the throughput migration {src.stats.status}: {src.stats.error}")
        code = dst.wait(GUEST_END_TIMEOUT_S)
        if code != 0:
            raise VmferryError(f"the destination exited with {code}: {dst.stderr()}")
        return src.stats


# ---- 2) vmferry against QEMU -----------------------------------------------------------------


def _one_run(vmm: str, case: Case, plan: MigratePlan, workdir: Path, progress: Progress) -> VmmRun:
    try:
        if vmm == "qemu":
            return run_qemu(case, plan, workdir, progress)
        return run_vmferry(case, plan, workdir)
    except (VmferryError, OSError, QmpProtocolError) as e:
        return VmmRun(vmm, "error", -1.0, -1.0, error=str(e) or type(e).__name__)


def bench_vs_qemu(plan: MigratePlan, workdir: Path, progress: Progress) -> list[CaseResult]:
    q.qemu_binary()
    out = []
    refs: dict[str, str] = {}
    for case in plan.cases:
        w = case.workload
        cmdline = plan.cmdline(case)
        result = CaseResult(case.memory, w.key, w.title, cmdline, "", plan.downtime_limit_ms)
        out.append(result)
        available = bench_fill.available_memory()
        if not bench_fill.fits(case.memory, available):
            result.skipped = (
                f"needs 2 × {case.memory // GIB} GiB + {bench_fill.MARGIN // GIB} GiB free, "
                f"{available / GIB:.1f} GiB available"
            )
            progress(f"vs QEMU: {case.label}: {result.skipped}")
            continue
        if cmdline not in refs:
            progress(f"vs QEMU: reference RESULT for {cmdline}")
            refs[cmdline] = reference_result(w, cmdline, case.memory, workdir)
        result.reference = refs[cmdline]
        for i, vmm in enumerate(abba(plan.repeats)):
            progress(f"vs QEMU: {case.label}: {vmm} (run {i + 1} of {2 * plan.repeats})")
            r = _one_run(vmm, case, plan, workdir, progress)
            r.order = i
            r.result_ok = bool(r.result) and r.result == result.reference
            if r.status == "completed" and not r.result_ok and not r.error:
                r.error = f"RESULT {r.result or 'missing'} != reference {result.reference}"
            progress(
                f"vs QEMU: {case.label}: {vmm}: {r.status}, total {r.total_ms:,.0f} ms, "
                f"downtime {r.downtime_ms:,.0f} ms{'' if r.good else ' — ' + (r.error or 'bad')}"
            )
            result.runs.append(r)
    return out


# ---- the whole run ------------------------------------------------------------------------


def host_load() -> dict[str, Any]:
    """How busy the host is: load averages and available memory, at a moment."""
    load: list[float] = []
    with contextlib.suppress(OSError, ValueError):
        load = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    return {"loadavg": load, "mem_available_gib": round(bench_fill.available_memory() / GIB, 1)}


def host_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    qemu = ""
    with contextlib.suppress(VmferryError, OSError, subprocess.SubprocessError):
        qemu = q.qemu_version()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu,
    }


@dataclass
class MigrateResults:
    fresh_memory_rate: float  # bytes/s: first touch of memory no process has held lately
    throughput: list[ThroughputResult]
    cases: list[CaseResult]
    load: dict[str, Any] = field(default_factory=dict)  # at the start and at the end

    def to_dict(self) -> dict[str, Any]:
        return {
            "fresh_memory_rate": self.fresh_memory_rate,
            "load": self.load,
            "throughput": [t.to_dict() for t in self.throughput],
            "vs_qemu": [c.to_dict() for c in self.cases],
            "independence": [
                {
                    "workload": i.workload,
                    "small": i.small,
                    "large": i.large,
                    "small_ms": i.small_ms,
                    "large_ms": i.large_ms,
                    "ratio": i.ratio if math.isfinite(i.ratio) else None,
                }
                for i in independence(self.cases)
            ],
        }


def fresh_memory_rate(size: int = GIB) -> float:
    """Bytes/s at which new guest-RAM-like memory (a memfd) is populated here.

    Every destination pays this for all of RAM (vmferry populates before it receives; QEMU
    faults pages in as they arrive). In a VM whose balloon reports free pages to its
    host, memory freed a few seconds ago is handed back, and touching it again is slow.
    """
    from vmferry.memory.guest_memory import GuestMemory

    mem = GuestMemory(size, name="bench-fresh")
    try:
        t0 = time.perf_counter()
        mem.populate()
        return size / (time.perf_counter() - t0)
    finally:
        mem.close()


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmferry-bench-migrate-") as d:
        yield Path(d)


def run_all(plan: MigratePlan, progress: Progress) -> MigrateResults:
    load = {"start": host_load()}
    progress(f"host load at the start: {load['start']}")
    fresh = fresh_memory_rate()
    progress(f"fresh memory is populated at {fresh / MB:,.0f} MB/s on this host")
    with _workdir() as d:
        throughput = bench_throughput(plan, d, progress) if plan.throughput else []
        cases = bench_vs_qemu(plan, d, progress)
    load["end"] = host_load()
    progress(f"host load at the end: {load['end']}")
    return MigrateResults(fresh, throughput, cases, load)


# ---- the vmferry source process (python -m vmferry.bench.migrate source …) -----------------


def _source_main(argv: list[str]) -> int:
    """``vmferry run memtouch --qmp`` with RAM filled from the host first; writes the
    migration report to --report before it exits."""
    from vmferry.controller import VmController

    argv, guest = source_proc.split_guest(argv)
    p = source_proc.source_parser("python -m vmferry.bench.migrate source", 300.0)
    p.add_argument("--fill", action="store_true", help="fill RAM from 32 MiB up (bench.fill)")
    args = p.parse_args(argv)
    config = MachineConfig(memory=args.memory, image="memtouch", cmdline=" ".join(guest))

    def until(controller: VmController, timeout_s: float) -> str:
        outcome = ""
        deadline = time.monotonic() + timeout_s
        while not outcome and time.monotonic() < deadline:
            outcome = controller.wait_for(0.05)
        return outcome

    outcome = source_proc.serve(args, config, VmController, until, fill=args.fill)
    print(f"vmferry bench source: {outcome or 'timed out'}", file=sys.stderr)
    return 0


__all__ = [
    "WORKLOADS",
    "MigratePlan",
    "MigrateResults",
    "abba",
    "host_info",
    "make_plan",
    "parse_sizes",
    "parse_workloads",
    "run_all",
]


if __name__ == "__main__":
    if sys.argv[1:2] != ["source"]:
        sys.exit("usage: python -m vmferry.bench.migrate source …")
    sys.exit(_source_main(sys.argv[2:]))
