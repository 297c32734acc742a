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

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.bench import fill as bench_fill
from vmferry.bench import qemu as q
from vmferry.bench.migrate_results import CaseResult, ThroughputResult, VmmRun, independence
from vmferry.bench.rawtcp import measure as raw_tcp
from vmferry.bench.vmm import WSS_BASE, fill_random
from vmferry.errors import ConfigError, VmferryError
from vmferry.machine import Machine, MachineConfig
from vmferry.machine.images import resolve_image
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.qmp.client import QmpClient, QmpProtocolError

Progress = Callable[[str], None]
MB = 1e6
GIB = 1 << 30
RESULT_RE = re.compile(rb"^RESULT ([0-9a-f]{16})$", re.MULTILINE)
BANNER = b"memtouch: vcpus="
VMFERRY = [sys.executable, "-m", "vmferry.cli.main"]
DOWNTIME_LIMIT_MS = 300
CHANNELS = 2
START_TIMEOUT_S = 30.0
# How long a guest may take to finish after its migration (or alone, for the reference):
# an 8 GiB case's guest runs ~100 s unpaced on this host when it is busy.
GUEST_END_TIMEOUT_S = 300.0
POLL_S = 0.05
GUEST_MARGIN_S = 3.0  # the guest's head start over the migration's timeout
REFERENCE_MEMORY = 2 * GIB  # RESULT does not depend on the RAM size: the reference is small


# ---- what to run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str  # as --workloads names it
    title: str
    cmdline: str  # memtouch's parameters; {rounds} is rounds_for(…)
    delay_s: float  # from the guest's first serial line to the migration (covers its fill)
    stop_first: bool = False  # stopped over QMP before the migration: an idle guest
    min_memory: int = 0
    # The fastest a round can go (s); None: the rounds are fixed (`rounds`). A running
    # guest must outlast the longest migration the bench allows: during QEMU's long
    # round 0 it runs at full speed (QEMU re-protects a page only as it sends it), and a
    # guest that ends first ends QEMU's source with it.
    round_s: float | None = None
    rounds: int = 3

    def rounds_for(self, lasting_s: float) -> int:
        """Rounds for a guest that goes on for at least ``lasting_s``."""
        if self.round_s is None:
            return self.rounds
        return math.ceil((lasting_s + self.delay_s) / self.round_s)

    def cmdline_for(self, lasting_s: float) -> str:
        return self.cmdline.format(rounds=self.rounds_for(lasting_s))


IDLE = Workload(
    "idle",
    "idle: guest stopped",
    # a guest that would idle for ~3 s of its own time: it only has to print RESULT after
    "wss=1M rate=1 rounds={rounds} seed=3",
    delay_s=0.2,
    stop_first=True,
)
WSS256 = Workload(
    "wss256",
    "256 MiB working set rewritten unpaced",
    "wss=256M rounds={rounds} seed=5",
    delay_s=1.0,  # its first fill of 256 MiB takes < 0.6 s on both
    round_s=0.06,  # 60-80 ms a round undisturbed on this host
)
WSS1G = Workload(
    "wss1g-512",
    "1 GiB working set at 512 MB/s",
    "wss=1G rate=512 rounds={rounds} seed=7",
    delay_s=2.5,  # the first fill of 1 GiB takes 2.1 s at 512 MB/s
    min_memory=2 * GIB,  # 1 GiB from 16 MiB up does not fit in a 1 GiB guest
    round_s=GIB / 512e6,  # 2.1 s: paced
)
WORKLOADS = {w.key: w for w in (IDLE, WSS256, WSS1G)}
SIZES_GIB = (1, 4, 8)


@dataclass(frozen=True)
class Case:
    memory: int
    workload: Workload

    @property
    def label(self) -> str:
        return f"{self.memory // GIB} GiB, {self.workload.key}"


@dataclass(frozen=True)
class MigratePlan:
    sizes: tuple[int, ...]  # GiB
    workloads: tuple[str, ...]  # keys of WORKLOADS
    repeats: int  # per VMM per case, in ABBA order
    ram_memory: int  # part 1
    ram_channels: tuple[int, ...]
    ram_repeat: int
    throughput: bool = True  # run part 1
    channels: int = CHANNELS
    downtime_limit_ms: int = DOWNTIME_LIMIT_MS

    @property
    def cases(self) -> tuple[Case, ...]:
        """Every size × workload that fits in a guest of that size, smallest first."""
        return tuple(
            Case(g * GIB, WORKLOADS[k])
            for g in self.sizes
            for k in self.workloads
            if WORKLOADS[k].min_memory <= g * GIB
        )

    def timeout_s(self, memory: int) -> float:
        """A migration not done by then is cancelled: "not converged"."""
        return 15.0 + 4.5 * memory / GIB

    def cmdline(self, case: Case) -> str:
        """The guest's parameters: the same for both VMMs; a running guest lasts past
        the timeout (and a few seconds of set-up)."""
        return case.workload.cmdline_for(self.timeout_s(case.memory) + GUEST_MARGIN_S)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``1,4,8`` → (1, 4, 8): guest sizes in GiB, each once, in order."""
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(
            f"--sizes {text!r}: want GiB counts separated by commas, e.g. 1,4,8"
        ) from None
    if not sizes or any(s < 1 or s > 64 for s in sizes):
        raise ConfigError(f"--sizes {text!r}: each size must be 1 to 64 GiB")
    return sizes


def parse_workloads(text: str) -> tuple[str, ...]:
    """``idle,wss256`` → those keys, in WORKLOADS' order."""
    asked = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(asked - WORKLOADS.keys())
    if unknown or not asked:
        raise ConfigError(
            f"--workloads {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(WORKLOADS)}"
        )
    return tuple(k for k in WORKLOADS if k in asked)


def make_plan(
    quick: bool = False,
    sizes: tuple[int, ...] | None = None,
    workloads: tuple[str, ...] | None = None,
    repeats: int | None = None,
    throughput: bool = True,
) -> MigratePlan:
    """The full run (1, 4, 8 GiB × all workloads, 2 repeats), or --quick (1 GiB, one
    repeat); --sizes, --workloads and --repeats override either."""
    if repeats is not None and not 1 <= repeats <= 20:
        raise ConfigError(f"--repeats {repeats}: must be 1 to 20")
    base_sizes = (1,) if quick else SIZES_GIB
    return MigratePlan(
        sizes=sizes or base_sizes,
        workloads=workloads or tuple(WORKLOADS),
        repeats=repeats or (1 if quick else 2),
        ram_memory=(1 if quick else 2) * GIB,
        ram_channels=(1, 2),
        ram_repeat=1 if quick else 2,
        throughput=throughput,
    )


def abba(repeats: int) -> list[str]:
    """The order the VMMs run in a case: QEMU, vmferry, vmferry, QEMU, …"""
    out: list[str] = []
    for i in range(repeats):
        pair = ["qemu", "vmferry"]
        out += pair if i % 2 == 0 else pair[::-1]
    return out


# ---- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise VmferryError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def _has(path: Path, needle: bytes) -> bool:
    try:
        return needle in path.read_bytes()
    except FileNotFoundError:
        return False


def _result(path: Path) -> str:
    try:
        found = RESULT_RE.findall(path.read_bytes())
    except FileNotFoundError:
        return ""
    return found[-1].decode() if found else ""


class _Proc:
    """A child process whose stderr is collected by a thread; killed on exit."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def stderr(self) -> str:
        return "\n".join(self.lines[-20:])

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise VmferryError(f"{' '.join(self.argv[:5])} … ran past {timeout:.0f} s") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._reader.join(5)

    def __enter__(self) -> _Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _vmferry_destination(port: int, serial: Path) -> _Proc:
    dst = _Proc(
        [
            *VMFERRY,
            "run",
            "--incoming",
            f"tcp:127.0.0.1:{port}",
            "--serial",
            str(serial),
            "--timeout",
            str(int(GUEST_END_TIMEOUT_S * 2)),
        ]
    )
    try:
        _wait_for(
            "the vmferry destination to listen",
            lambda: (
                any("waiting for a migration" in s for s in dst.lines)
                or dst.proc.poll() is not None
            ),
            START_TIMEOUT_S,
        )
        if dst.proc.poll() is not None:
            raise VmferryError(f"the vmferry destination exited: {dst.stderr()}")
    except BaseException:
        dst.kill()
        raise
    return dst


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
    with _vmferry_destination(port, workdir / "throughput-dst.serial") as dst:
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


def reference_result(workload: Workload, cmdline: str, memory: int, workdir: Path) -> str:
    """RESULT of an undisturbed run. It depends on the parameters but not on ``rate`` nor
    the RAM size (see memtouch.c), so the reference runs unpaced in a small guest."""
    cmdline = re.sub(r"\brate=\d+", "rate=0", cmdline)
    serial = workdir / "reference.serial"
    serial.unlink(missing_ok=True)
    size = min(memory, max(REFERENCE_MEMORY, workload.min_memory))
    argv = [*VMFERRY, "run", "memtouch", "--memory", f"{size >> 20}M", "--serial", str(serial)]
    argv += ["--timeout", str(int(GUEST_END_TIMEOUT_S)), "--", *cmdline.split()]
    p = subprocess.run(argv, capture_output=True, timeout=GUEST_END_TIMEOUT_S + 30)
    if p.returncode != 0:
        raise VmferryError(f"reference run failed ({p.returncode}): {p.stderr.decode()[-500:]}")
    res = _result(serial)
    if not res:
        raise VmferryError("the reference run printed no RESULT")
    return res


def _report_verify(rep: dict[str, Any]) -> dict[str, Any]:
    v = rep.get("verify")
    return dict(v) if isinstance(v, dict) else {}


def _verify_parameter(qmp: QmpClient) -> dict[str, Any]:
    """x-verify "on" where the source knows the parameter (two-phase verification); the
    capability alone (on by default) otherwise."""
    known = qmp.execute("query-migrate-parameters")
    return {"x-verify": "on"} if isinstance(known, dict) and "x-verify" in known else {}


def run_vmferry(case: Case, plan: MigratePlan, workdir: Path) -> VmmRun:
    w = case.workload
    port = free_port()
    src_serial, dst_serial = workdir / "vmferry-src.serial", workdir / "vmferry-dst.serial"
    qmp_path, report = workdir / "vmferry-src.qmp", workdir / "vmferry-report.json"
    for p in (src_serial, dst_serial, qmp_path, report):
        p.unlink(missing_ok=True)
    argv = [*VMFERRY[:2], "vmferry.bench.migrate", "source", "--memory", str(case.memory)]
    argv += ["--serial", str(src_serial), "--qmp", str(qmp_path), "--report", str(report)]
    argv += ["--fill", "--", *plan.cmdline(case).split()]
    timeout = plan.timeout_s(case.memory)
    with _vmferry_destination(port, dst_serial) as dst, _Proc(argv) as src:
        _wait_for(
            "the vmferry source's QMP socket",
            lambda: qmp_path.exists() or src.proc.poll() is not None,
            START_TIMEOUT_S + case.memory / GIB * 5,  # it fills RAM first
        )
        if src.proc.poll() is not None:
            raise VmferryError(f"the vmferry source exited: {src.stderr()}")
        status, error = "?", ""
        with QmpClient(str(qmp_path), timeout=q.QMP_TIMEOUT_S) as qmp:
            qmp.execute(
                "migrate-set-parameters",
                **{
                    "multifd-channels": plan.channels,
                    "downtime-limit": plan.downtime_limit_ms,
                    "max-bandwidth": 0,  # vmferry's "unlimited"
                    **_verify_parameter(qmp),
                },
            )
            qmp.execute(
                "migrate-set-capabilities",
                capabilities=[
                    {"capability": "multifd", "state": plan.channels > 1},
                    {"capability": "x-verify", "state": True},
                ],
            )
            _wait_for("the guest's first line", lambda: _has(src_serial, BANNER), START_TIMEOUT_S)
            time.sleep(w.delay_s)
            if w.stop_first:
                qmp.execute("stop")
            qmp.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
            deadline = time.monotonic() + timeout
            try:
                while status not in q.DONE:
                    if time.monotonic() > deadline:
                        qmp.execute("migrate_cancel")
                        error = f"not converged within {timeout:.0f} s"
                        deadline = math.inf
                    time.sleep(POLL_S)
                    status = str(qmp.execute("query-migrate").get("status", "?"))
                if status != "completed":
                    qmp.execute("quit")  # the source writes its report, then exits
            except (QmpProtocolError, OSError):
                pass  # the source exits once the VM runs on the destination
        src.wait(START_TIMEOUT_S)
        try:
            rep: dict[str, Any] = json.loads(report.read_text())
        except (OSError, ValueError) as e:
            raise VmferryError(f"no migration report from the vmferry source: {e}") from None
        status = str(rep.get("status", status))
        if error and status == "completed":
            # Past the switchover a migration no longer cancels: it was converged.
            error = f"completed after the bench's cancel at {timeout:.0f} s (too late to cancel)"
        run = VmmRun(
            "vmferry",
            status,
            float(rep.get("total-time", -1)),
            float(rep.get("downtime", -1)) if status == "completed" else -1.0,
            rounds=len(rep.get("rounds", [])),
            transferred=int(rep.get("ram", {}).get("transferred", 0)),
            setup_ms=float(rep.get("setup-time", -1)),
            round0_rate=_round0_rate(rep),
            expected_downtime_ms=float(rep.get("expected-downtime", -1)),
            breakdown={k: float(v) for k, v in rep.get("downtime-breakdown", {}).items()},
            verify=_report_verify(rep),
            error="; ".join(x for x in (error, str(rep.get("error-desc", ""))) if x),
        )
        if status != "completed":
            dst.kill()
            last = dst.lines[-1] if dst.lines else "(nothing)"
            run.error += f"; after {run.rounds} rounds, the destination said: {last}"
        else:
            code = dst.wait(GUEST_END_TIMEOUT_S)
            run.result = _result(dst_serial)
            if code != 0:
                run.error = f"destination exit status {code}: {dst.stderr()}"
    return run


def _round0_rate(rep: dict[str, Any]) -> float:
    rounds = rep.get("rounds", [])
    if not rounds or float(rounds[0].get("duration", 0)) <= 0:
        return -1.0
    return float(rounds[0]["bytes"]) / float(rounds[0]["duration"])


def run_qemu(case: Case, plan: MigratePlan, workdir: Path, progress: Progress) -> VmmRun:
    image = resolve_image("memtouch").with_suffix(".elf32")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    fill = shm / f"vmferry-bench-fill-{os.getpid()}-{case.memory >> 20}M"
    # Written for each QEMU run and removed after it: QEMU's guest writes into it (it is
    # its RAM), and while vmferry runs it would be a third copy of the guest's RAM.
    progress(f"vs QEMU: {case.label}: writing the RAM fill {fill}")
    try:
        bench_fill.write_fill_file(fill, case.memory)
        return _run_qemu(case, plan, workdir, image, fill)
    finally:
        fill.unlink(missing_ok=True)


def _run_qemu(case: Case, plan: MigratePlan, workdir: Path, image: Path, fill: Path) -> VmmRun:
    w = case.workload
    src_g = q.QemuGuest(
        image,
        case.memory,
        plan.cmdline(case),
        workdir / "qemu-src.serial",
        workdir / "qemu-src.qmp",
        ram_file=fill,
    )
    dst_g = q.QemuGuest(
        image,
        case.memory,
        plan.cmdline(case),
        workdir / "qemu-dst.serial",
        workdir / "qemu-dst.qmp",
        incoming=True,
    )
    port = free_port()
    with q.QemuProcess(dst_g) as dst, q.QemuProcess(src_g) as src:
        for vm in (dst, src):
            q.configure(vm, plan.channels, plan.downtime_limit_ms)
        dst.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        _wait_for(
            "the guest's first line under QEMU",
            lambda: _has(src_g.serial, BANNER) or src.proc.poll() is not None,
            START_TIMEOUT_S,
        )
        time.sleep(w.delay_s)
        if w.stop_first:
            src.execute("stop")
        try:
            mig = q.migrate(src, dst, port, plan.timeout_s(case.memory), running=not w.stop_first)
        except (OSError, QmpProtocolError) as e:
            code = src.proc.poll()
            why = " (1: the guest ended first)" if code == 1 else ""
            raise VmferryError(
                f"QEMU's source went away during the migration ({e}; exit status "
                f"{code}{why}): {src.log()[-300:]}"
            ) from None
        run = VmmRun(
            "qemu",
            mig.status,
            mig.total_ms,
            mig.downtime_ms,
            stop_to_resume_ms=mig.stop_to_resume_ms,
            rounds=int(mig.info.get("ram", {}).get("dirty-sync-count", 0)),
            transferred=int(mig.info.get("ram", {}).get("transferred", 0)),
            setup_ms=mig.setup_ms,
            round0_rate=mig.round0_rate,
            error=mig.error,
        )
        if mig.status == "completed":
            if w.stop_first:
                # A `cont` while the destination still loads is dropped when the VM
                # arrives paused: wait until it has left "inmigrate".
                _wait_for(
                    "QEMU's destination to finish loading",
                    lambda: dst.execute("query-status").get("status") != "inmigrate",
                    q.QMP_TIMEOUT_S,
                )
                dst.execute("cont")
            code = dst.wait(GUEST_END_TIMEOUT_S)
            run.result = _result(dst_g.serial)
            if code != 1:  # isa-debug-exit: (0 << 1) | 1
                run.error = f"QEMU destination exit status {code} (1 is the guest's 0)"
    return run


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
    from vmferry.migration import report as mig_report
    from vmferry.qmp.server import QmpServer

    guest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, guest = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m vmferry.bench.migrate source")
    p.add_argument("--memory", type=int, required=True)
    p.add_argument("--serial", required=True)
    p.add_argument("--qmp", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--fill", action="store_true", help="fill RAM from 32 MiB up (bench.fill)")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    config = MachineConfig(memory=args.memory, image="memtouch", cmdline=" ".join(guest))
    outcome = ""
    with open(args.serial, "ab") as serial, Machine.boot(config, serial=serial) as m:
        if args.fill:
            bench_fill.fill_memory(m.memory)
        controller = VmController(m)
        server = QmpServer(args.qmp, controller)
        controller.emit = server.emit
        try:
            server.start()
            m.start()
            deadline = time.monotonic() + args.timeout
            while not outcome and time.monotonic() < deadline:
                outcome = controller.wait_for(0.05)
            mig = controller.migration
            if mig is not None:
                mig.wait(60)
                doc = mig_report.report_dict(mig.stats, mig.params, mig.caps)
                Path(args.report).write_text(json.dumps(doc, indent=2))
        finally:
            server.close()
    print(f"vmferry bench source: {outcome or 'timed out'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["source"]:
        sys.exit("usage: python -m vmferry.bench.migrate source …")
    sys.exit(_source_main(sys.argv[2:]))
