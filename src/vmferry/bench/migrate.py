"""Migration benchmarks: vmferry's RAM copy against raw TCP, and vmferry against QEMU.

1. RAM throughput. A 2 GiB guest, booted but never run (paused), its RAM above 16 MiB
   filled from the host with incompressible data, is migrated by ``MigrationSource`` (in
   this process) to a ``vmferry run --incoming tcp:`` process, over 1 and 2 channels. Its
   rate (round 0's bytes ÷ round 0's time, from the migration's own statistics; and all
   bytes ÷ the whole migration) is set against raw loopback TCP between two processes
   carrying the same number of bytes over as many streams (``vmferry.bench.rawtcp``).

2. vmferry against QEMU, on the same multiboot image (memtouch), the same RAM size, one
   vCPU (QEMU starts only vCPU 0 of a multiboot image), the same guest parameters, over
   loopback with no bandwidth cap, the same downtime limit and the same channel count. Both
   destinations are separate processes waiting on a port; both sources are driven over
   QMP; both guests must print on the destination the RESULT an undisturbed run prints.
   The migration starts at the same point of guest time: a fixed delay after the guest's
   first serial line (QEMU spends ~2.7 s in its firmware before that line).

What "idle" means here: RAM filled from the host with the same bytes for both VMMs (a
file in /dev/shm that QEMU maps as its RAM and vmferry reads into its RAM), the guest
booted, then stopped over QMP before the migration. A *running* idle guest is not
comparable: memtouch idles by writing to vmferry's halt port, which parks the vCPU under
vmferry but is an unassigned port under QEMU, so there the vCPU spins and takes one of the
host's cores from the migration.

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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmferry.bench import qemu as q
from vmferry.bench.rawtcp import measure as raw_tcp
from vmferry.bench.vmm import WSS_BASE, fill_random
from vmferry.errors import VmferryError
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
FILL_START = 32 << 20  # host-made data from here up; the guest's image and wss lie below
START_TIMEOUT_S = 30.0
GUEST_END_TIMEOUT_S = 120.0
POLL_S = 0.05


# ---- what to run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    cmdline: str  # memtouch's parameters
    delay_s: float  # from the guest's first serial line to the migration (covers the fill)
    host_fill: bool = False  # RAM above FILL_START filled from the host
    stop_first: bool = False  # stopped over QMP before the migration: an idle guest
    min_memory: int = 0


IDLE = Workload(
    "idle: RAM filled from the host, guest stopped",
    # a guest that would idle for ~3 s of its own time: it only has to print RESULT after
    "wss=1M rate=1 rounds=3 seed=3",
    delay_s=0.2,
    host_fill=True,
    stop_first=True,
)
DIRTY_FAST = Workload(
    "dirtying: 512 MiB wss, unlimited rate",
    "wss=512M rounds=80 seed=5",
    delay_s=1.5,  # the fill of 512 MiB takes < 1.2 s on both
)
DIRTY_RATE = Workload(
    "dirtying: 1 GiB wss at 512 MB/s",
    "wss=1G rate=512 rounds=8 seed=7",
    delay_s=2.5,  # the fill of 1 GiB takes 2.1 s at 512 MB/s
    min_memory=2 * GIB,
)


@dataclass(frozen=True)
class Case:
    memory: int
    workload: Workload

    @property
    def label(self) -> str:
        return f"{self.memory // GIB} GiB, {self.workload.name}"


@dataclass(frozen=True)
class MigratePlan:
    ram_memory: int
    ram_channels: tuple[int, ...]
    repeat: int  # part 1: best of this many, for vmferry and raw TCP alike
    cases: tuple[Case, ...]
    channels: int  # part 2: the same for both VMMs
    timeout_s: float  # a migration not done by then is cancelled: "not converged"
    case_repeat: int  # part 2: QEMU and vmferry this many times each, the fastest kept


def _cases(sizes: tuple[int, ...]) -> tuple[Case, ...]:
    return tuple(
        Case(m, w) for m in sizes for w in (IDLE, DIRTY_FAST, DIRTY_RATE) if w.min_memory <= m
    )


FULL = MigratePlan(2 * GIB, (1, 2), 2, _cases((GIB, 4 * GIB)), 2, 30.0, 2)
QUICK = MigratePlan(GIB, (1, 2), 1, _cases((GIB,)), 2, 20.0, 1)

# What runs in part 2: QEMU, vmferry as it comes (x-verify on: page digests compared
# before the destination resumes), and vmferry without that check, which QEMU does not do.
VARIANTS = ("qemu", "vmferry", "vmferry-noverify")


# ---- results --------------------------------------------------------------------------------


@dataclass
class ThroughputResult:
    channels: int
    round0_bytes: int
    round0_rate: float  # bytes/s, best of the repeats
    end_to_end_bytes: int
    end_to_end_rate: float  # all bytes ÷ total-time
    total_ms: float
    downtime_ms: float
    raw_bytes: int
    raw_rate: float  # bytes/s over as many streams as channels
    raw_one_stream_rate: float

    @property
    def round0_ratio(self) -> float:
        return self.round0_rate / self.raw_rate

    @property
    def end_to_end_ratio(self) -> float:
        return self.end_to_end_rate / self.raw_rate

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "round0_ratio": self.round0_ratio,
            "end_to_end_ratio": self.end_to_end_ratio,
        }


@dataclass
class VmmRun:
    """One migration by one VMM. Times in ms as each VMM reports them; -1 = none."""

    vmm: str
    status: str
    total_ms: float
    downtime_ms: float
    result_ok: bool
    result: str = ""
    stop_to_resume_ms: float = -1.0  # QEMU only: source STOP event → destination RESUME
    rounds: int = 0
    transferred: int = 0
    setup_ms: float = -1.0  # as reported (vmferry: until the destination accepted)
    breakdown: dict[str, float] = field(default_factory=dict)  # vmferry's downtime parts
    round0_rate: float = -1.0  # vmferry: bytes/s of its first round
    error: str = ""


@dataclass
class CaseResult:
    case: str
    memory: int
    workload: str
    cmdline: str
    reference: str
    vmferry: VmmRun  # the fastest completed run of each (total time)
    qemu: VmmRun
    vmferry_noverify: VmmRun
    runs: list[VmmRun] = field(default_factory=list)  # all of them, in the order run

    @property
    def ok(self) -> bool:
        return self.vmferry.status == "completed" and self.qemu.status == "completed"

    @property
    def total_ratio(self) -> float:
        return _ratio(self.vmferry.total_ms, self.qemu.total_ms) if self.ok else math.nan

    @property
    def downtime_ratio(self) -> float:
        return _ratio(self.vmferry.downtime_ms, self.qemu.downtime_ms) if self.ok else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "total_ratio": _json_num(self.total_ratio),
            "downtime_ratio": _json_num(self.downtime_ratio),
        }


def _ratio(a: float, b: float) -> float:
    return a / b if a >= 0 and b > 0 else math.nan


def _json_num(x: float) -> float | None:
    return x if math.isfinite(x) else None


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
        raw_best: dict[int, tuple[float, int]] = {}
        for streams in sorted({1, *plan.ram_channels}):
            progress(f"throughput: raw loopback TCP, {streams} stream(s), best of {plan.repeat}")
            runs = [raw_tcp(m.memory.view(0, m.memory.size), streams) for _ in range(plan.repeat)]
            raw_best[streams] = (max(r.rate for r in runs), runs[0].nbytes)
        for channels in plan.ram_channels:
            progress(f"throughput: vmferry migration, {channels} channel(s), best of {plan.repeat}")
            best: dict[str, Any] = {}
            for _ in range(plan.repeat):
                st = _migrate_in_process(m, channels, workdir, plan.timeout_s)
                r0 = st.rounds[0]
                rate0 = r0.bytes / r0.duration_s
                if not best or rate0 > best["round0_rate"]:
                    best = {
                        "round0_bytes": r0.bytes,
                        "round0_rate": rate0,
                        "end_to_end_bytes": st.transferred,
                        "end_to_end_rate": st.transferred / (st.total_ms / 1e3),
                        "total_ms": st.total_ms,
                        "downtime_ms": st.downtime_ms,
                    }
            raw_rate, raw_bytes = raw_best[channels]
            out.append(
                ThroughputResult(
                    channels=channels,
                    raw_bytes=raw_bytes,
                    raw_rate=raw_rate,
                    raw_one_stream_rate=raw_best[1][0],
                    **best,
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


def make_fill_file(path: Path, size: int, progress: Progress) -> None:
    """RAM image for the host-filled guests: zero below FILL_START, then the same
    incompressible data ``fill_random`` makes (one random block XORed per 64 MiB chunk)."""
    progress(f"vs QEMU: writing the {size // GIB} GiB RAM fill {path}")
    path.unlink(missing_ok=True)
    mm = np.memmap(path, dtype=np.uint64, mode="w+", shape=(size // 8,))
    try:
        chunk = 64 << 20
        block = np.frombuffer(np.random.default_rng(11).bytes(chunk), dtype=np.uint64)
        for i, off in enumerate(range(FILL_START, size, chunk)):
            n = min(chunk, size - off) // 8
            key = np.uint64((0x9E3779B97F4A7C15 * (i + 1)) & (2**64 - 1))
            np.bitwise_xor(block[:n], key, out=mm[off // 8 : off // 8 + n])
        mm.flush()
    finally:
        del mm


def reference_result(workload: Workload, memory: int, workdir: Path) -> str:
    """RESULT of an undisturbed run. It depends on the parameters but not on ``rate`` (see
    memtouch.c), so the reference runs unpaced."""
    cmdline = re.sub(r"\brate=\d+", "rate=0", workload.cmdline)
    serial = workdir / "reference.serial"
    serial.unlink(missing_ok=True)
    argv = [*VMFERRY, "run", "memtouch", "--memory", f"{memory >> 20}M", "--serial", str(serial)]
    argv += ["--timeout", str(int(GUEST_END_TIMEOUT_S)), "--", *cmdline.split()]
    p = subprocess.run(argv, capture_output=True, timeout=GUEST_END_TIMEOUT_S + 30)
    if p.returncode != 0:
        raise VmferryError(f"reference run failed ({p.returncode}): {p.stderr.decode()[-500:]}")
    res = _result(serial)
    if not res:
        raise VmferryError("the reference run printed no RESULT")
    return res


def run_vmferry(
    case: Case, plan: MigratePlan, fill: Path | None, workdir: Path, *, verify: bool = True
) -> VmmRun:
    w = case.workload
    port = free_port()
    src_serial, dst_serial = workdir / "vmferry-src.serial", workdir / "vmferry-dst.serial"
    qmp_path, report = workdir / "vmferry-src.qmp", workdir / "vmferry-report.json"
    for p in (src_serial, dst_serial, qmp_path, report):
        p.unlink(missing_ok=True)
    argv = [*VMFERRY[:2], "vmferry.bench.migrate", "source", "--memory", str(case.memory)]
    argv += ["--serial", str(src_serial), "--qmp", str(qmp_path), "--report", str(report)]
    if fill is not None:
        argv += ["--fill", str(fill)]
    argv += ["--", *w.cmdline.split()]
    with _vmferry_destination(port, dst_serial) as dst, _Proc(argv) as src:
        _wait_for(
            "the vmferry source's QMP socket",
            lambda: qmp_path.exists() or src.proc.poll() is not None,
            START_TIMEOUT_S,
        )
        if src.proc.poll() is not None:
            raise VmferryError(f"the vmferry source exited: {src.stderr()}")
        status, error = "?", ""
        with QmpClient(str(qmp_path), timeout=q.QMP_TIMEOUT_S) as qmp:
            qmp.execute(
                "migrate-set-parameters",
                **{
                    "multifd-channels": plan.channels,
                    "downtime-limit": DOWNTIME_LIMIT_MS,
                    "max-bandwidth": 0,  # vmferry's "unlimited"
                },
            )
            qmp.execute(
                "migrate-set-capabilities",
                capabilities=[
                    {"capability": "multifd", "state": plan.channels > 1},
                    {"capability": "x-verify", "state": verify},
                ],
            )
            _wait_for("the guest's first line", lambda: _has(src_serial, BANNER), START_TIMEOUT_S)
            time.sleep(w.delay_s)
            if w.stop_first:
                qmp.execute("stop")
            qmp.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
            deadline = time.monotonic() + plan.timeout_s
            try:
                while status not in q.DONE:
                    if time.monotonic() > deadline:
                        qmp.execute("migrate_cancel")
                        error = f"not converged within {plan.timeout_s:.0f} s"
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
        run = VmmRun(
            "vmferry" if verify else "vmferry-noverify",
            status,
            float(rep.get("total-time", -1)),
            float(rep.get("downtime", -1)) if status == "completed" else -1.0,
            False,
            rounds=len(rep.get("rounds", [])),
            transferred=int(rep.get("ram", {}).get("transferred", 0)),
            setup_ms=float(rep.get("setup-time", -1)),
            round0_rate=_round0_rate(rep),
            breakdown={k: float(v) for k, v in rep.get("downtime-breakdown", {}).items()},
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


def _zero_below_fill(fill: Path) -> None:
    """QEMU maps the fill file shared, so its last guest wrote below FILL_START: clear it."""
    with open(fill, "r+b") as f:
        f.write(bytes(FILL_START))


def run_qemu(case: Case, plan: MigratePlan, fill: Path | None, workdir: Path) -> VmmRun:
    w = case.workload
    if fill is not None:
        _zero_below_fill(fill)
    image = resolve_image("memtouch").with_suffix(".elf32")
    src_g = q.QemuGuest(
        image,
        case.memory,
        w.cmdline,
        workdir / "qemu-src.serial",
        workdir / "qemu-src.qmp",
        ram_file=fill,
    )
    dst_g = q.QemuGuest(
        image,
        case.memory,
        w.cmdline,
        workdir / "qemu-dst.serial",
        workdir / "qemu-dst.qmp",
        incoming=True,
    )
    port = free_port()
    with q.QemuProcess(dst_g) as dst, q.QemuProcess(src_g) as src:
        for vm in (dst, src):
            q.configure(vm, plan.channels, DOWNTIME_LIMIT_MS)
        dst.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        _wait_for(
            "the guest's first line under QEMU",
            lambda: _has(src_g.serial, BANNER) or src.proc.poll() is not None,
            START_TIMEOUT_S,
        )
        time.sleep(w.delay_s)
        if w.stop_first:
            src.execute("stop")
        mig = q.migrate(src, dst, port, plan.timeout_s, running=not w.stop_first)
        run = VmmRun(
            "qemu",
            mig.status,
            mig.total_ms,
            mig.downtime_ms,
            False,
            stop_to_resume_ms=mig.stop_to_resume_ms,
            rounds=int(mig.info.get("ram", {}).get("dirty-sync-count", 0)),
            transferred=int(mig.info.get("ram", {}).get("transferred", 0)),
            setup_ms=mig.setup_ms,
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


def _one_run(
    variant: str, case: Case, plan: MigratePlan, fill: Path | None, workdir: Path
) -> VmmRun:
    try:
        if variant == "qemu":
            return run_qemu(case, plan, fill, workdir)
        return run_vmferry(case, plan, fill, workdir, verify=variant == "vmferry")
    except VmferryError as e:
        return VmmRun(variant, "error", -1.0, -1.0, False, error=str(e))


def _best(runs: list[VmmRun], variant: str) -> VmmRun:
    """The fastest good run (completed, right RESULT); else the first of that variant."""
    mine = [r for r in runs if r.vmm == variant]
    good = [r for r in mine if r.status == "completed" and r.result_ok]
    return min(good, key=lambda r: r.total_ms) if good else mine[0]


def bench_vs_qemu(plan: MigratePlan, workdir: Path, progress: Progress) -> list[CaseResult]:
    q.qemu_binary()
    out = []
    refs: dict[str, str] = {}
    fills: dict[int, Path] = {}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    try:
        for case in plan.cases:
            w = case.workload
            if w.cmdline not in refs:
                progress(f"vs QEMU: reference RESULT for {w.cmdline}")
                refs[w.cmdline] = reference_result(w, case.memory, workdir)
            fill: Path | None = None
            if w.host_fill:
                if case.memory not in fills:
                    for old in fills.values():
                        old.unlink(missing_ok=True)
                    fills.clear()
                    path = shm / f"vmferry-bench-fill-{os.getpid()}-{case.memory >> 20}M"
                    make_fill_file(path, case.memory, progress)
                    fills[case.memory] = path
                fill = fills[case.memory]
            runs: list[VmmRun] = []
            for i in range(plan.case_repeat):
                # ABBA: the second round runs in the opposite order, so neither VMM is
                # always the one that runs right after a memory-hungry other.
                order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    if variant == "vmferry-noverify" and i > 0:
                        continue  # once is enough to see what the check costs
                    progress(f"vs QEMU: {case.label}: {variant} ({i + 1}/{plan.case_repeat})")
                    r = _one_run(variant, case, plan, fill, workdir)
                    r.result_ok = bool(r.result) and r.result == refs[w.cmdline]
                    if r.status == "completed" and not r.result_ok and not r.error:
                        r.error = f"RESULT {r.result or 'missing'} != reference {refs[w.cmdline]}"
                    runs.append(r)
            out.append(
                CaseResult(
                    case.label,
                    case.memory,
                    w.name,
                    w.cmdline,
                    refs[w.cmdline],
                    _best(runs, "vmferry"),
                    _best(runs, "qemu"),
                    _best(runs, "vmferry-noverify"),
                    runs,
                )
            )
    finally:
        for p in fills.values():
            p.unlink(missing_ok=True)
    return out


# ---- the whole run ------------------------------------------------------------------------


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "fresh_memory_rate": self.fresh_memory_rate,
            "throughput": [t.to_dict() for t in self.throughput],
            "vs_qemu": [c.to_dict() for c in self.cases],
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
    fresh = fresh_memory_rate()
    progress(f"fresh memory is populated at {fresh / MB:,.0f} MB/s on this host")
    with _workdir() as d:
        return MigrateResults(
            fresh, bench_throughput(plan, d, progress), bench_vs_qemu(plan, d, progress)
        )


# ---- presentation ---------------------------------------------------------------------------


def _mbs(rate: float) -> str:
    return f"{rate / MB:,.0f}"


def _ms(value: float) -> str:
    return "-" if value < 0 or not math.isfinite(value) else f"{value:,.0f}"


def _x(ratio: float) -> str:
    return "-" if not math.isfinite(ratio) else f"{ratio:.2f}"


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


THROUGHPUT_COLUMNS = (
    "channels",
    "vmferry round 0 MB/s",
    "vmferry end-to-end MB/s",
    "raw TCP MB/s (same streams)",
    "raw TCP 1 stream MB/s",
    "round 0 / raw",
    "end-to-end / raw",
    "≥ 0.9?",
)
QEMU_COLUMNS = (
    "guest",
    "workload",
    "vmferry total ms",
    "QEMU total ms",
    "total ratio",
    "≤ 0.5?",
    "vmferry downtime ms",
    "QEMU downtime ms",
    "downtime ratio",
    "≤ 1?",
    "vmferry x-verify off: total / downtime ms",
    "QEMU STOP→RESUME ms",
    "RESULT ok (vmferry / off / QEMU)",
    "notes",
)


def throughput_rows(results: list[ThroughputResult]) -> list[list[str]]:
    return [
        [
            str(t.channels),
            _mbs(t.round0_rate),
            _mbs(t.end_to_end_rate),
            _mbs(t.raw_rate),
            _mbs(t.raw_one_stream_rate),
            _x(t.round0_ratio),
            _x(t.end_to_end_ratio),
            _mark(t.round0_ratio >= 0.9),
        ]
        for t in results
    ]


def _notes(c: CaseResult) -> str:
    v, qm = c.vmferry, c.qemu
    parts = []
    if v.breakdown:
        b = v.breakdown
        parts.append(
            "vmferry downtime: "
            + ", ".join(
                f"{k} {b.get(k, 0.0):.0f}" for k in ("final-ram", "cpu-state", "verify", "resume")
            )
            + " ms"
        )
    parts.append(f"setup: vmferry {_ms(v.setup_ms)} ms, QEMU {_ms(qm.setup_ms)} ms")
    if v.round0_rate > 0:
        parts.append(f"vmferry round 0 at {_mbs(v.round0_rate)} MB/s")
    parts.append(f"rounds: vmferry {v.rounds}, QEMU dirty syncs {qm.rounds}")
    parts.append(f"sent: vmferry {v.transferred / MB:,.0f} MB, QEMU {qm.transferred / MB:,.0f} MB")
    for r in c.runs:
        if r.error:
            parts.append(f"{r.vmm}: {r.error}")
    return "; ".join(parts)


def qemu_rows(results: list[CaseResult]) -> list[list[str]]:
    return [
        [
            f"{c.memory // GIB} GiB",
            c.workload,
            _ms(c.vmferry.total_ms),
            _ms(c.qemu.total_ms),
            _x(c.total_ratio),
            _mark(c.total_ratio <= 0.5),
            _ms(c.vmferry.downtime_ms),
            _ms(c.qemu.downtime_ms),
            _x(c.downtime_ratio),
            _mark(c.downtime_ratio <= 1.0),
            f"{_ms(c.vmferry_noverify.total_ms)} / {_ms(c.vmferry_noverify.downtime_ms)}",
            _ms(c.qemu.stop_to_resume_ms),
            " / ".join(_mark(r.result_ok) for r in (c.vmferry, c.vmferry_noverify, c.qemu)),
            _notes(c),
        ]
        for c in results
    ]


def markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---- the vmferry source process (python -m vmferry.bench.migrate source …) -----------------


def _source_main(argv: list[str]) -> int:
    """``vmferry run memtouch --qmp`` with RAM filled from a file first; writes the
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
    p.add_argument("--fill", help="copy RAM from FILL_START up from this file")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    config = MachineConfig(memory=args.memory, image="memtouch", cmdline=" ".join(guest))
    with open(args.serial, "ab") as serial, Machine.boot(config, serial=serial) as m:
        if args.fill:
            view = m.memory.view(0, m.memory.size).cast("B")
            with open(args.fill, "rb", buffering=0) as f:
                f.seek(FILL_START)
                pos = FILL_START
                while pos < m.memory.size:
                    n = f.readinto(view[pos : min(m.memory.size, pos + (256 << 20))])
                    if not n:
                        raise VmferryError(f"{args.fill} is shorter than the guest's RAM")
                    pos += n
        controller = VmController(m)
        server = QmpServer(args.qmp, controller)
        controller.emit = server.emit
        try:
            server.start()
            m.start()
            deadline = time.monotonic() + args.timeout
            outcome = ""
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
