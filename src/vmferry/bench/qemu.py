"""QEMU as the benchmark's reference: start it, talk QMP to it, migrate it, always end it.

Every QEMU process is started in its own process group with a QMP socket and its serial
console in a file, and is killed when the ``QemuProcess`` context ends for any reason;
every wait has a timeout. Nothing here comes from QEMU's code: it is driven through its
command line and QMP only, with vmferry's own QMP client.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from vmferry.errors import VmferryError
from vmferry.qmp.client import QmpClient

QEMU = "qemu-system-x86_64"
START_TIMEOUT_S = 20.0
QMP_TIMEOUT_S = 30.0
POLL_S = 0.05
# "Unlimited" for QEMU, whose default is 128 MiB/s: 100 GiB/s is far above loopback.
UNLIMITED_BANDWIDTH = 100 << 30
DONE = ("completed", "failed", "cancelled")


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise VmferryError(f"{QEMU} is not installed (the QEMU comparison needs it)")
    return path


def qemu_version() -> str:
    out = subprocess.run(
        [qemu_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.splitlines()[0].strip()


@dataclass(frozen=True)
class QemuGuest:
    """One QEMU VM: a multiboot image with 1 vCPU (QEMU starts only vCPU 0 of one)."""

    image: Path  # the ELF32 copy of the image
    memory: int  # bytes
    cmdline: str
    serial: Path
    qmp: Path
    # RAM is this tmpfs file, mapped shared and pre-faulted (as vmferry's memfd RAM is)
    # instead of anonymous memory: how the benchmark puts the same host-made data in
    # QEMU's RAM as in vmferry's.
    ram_file: Path | None = None
    incoming: bool = False  # wait for `migrate-incoming` (-incoming defer)
    start_paused: bool = False

    def argv(self) -> list[str]:
        mib = self.memory >> 20
        if self.ram_file is not None:
            backend = (
                f"memory-backend-file,id=ram0,size={mib}M,mem-path={self.ram_file},"
                "share=on,prealloc=on"
            )
        else:
            backend = f"memory-backend-ram,id=ram0,size={mib}M"
        argv = [
            qemu_binary(),
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-smp",
            "1",
            "-m",
            f"{mib}M",
            "-object",
            backend,
            "-machine",
            "pc,memory-backend=ram0",
            # No default NIC, VGA (16 MiB of video RAM QEMU would migrate too) or drives:
            # guest RAM is then nearly all there is to move, as with vmferry.
            "-nodefaults",
            "-kernel",
            str(self.image),
            "-append",
            self.cmdline,
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-serial",
            f"file:{self.serial}",
            "-monitor",
            "none",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.qmp},server=on,wait=off",
        ]
        if self.incoming:
            argv += ["-incoming", "defer"]
        if self.start_paused:
            argv.append("-S")
        return argv


def migration_pair(
    image: Path, memory: int, cmdline: str, workdir: Path, ram_file: Path
) -> tuple[QemuGuest, QemuGuest]:
    """A migration's source (its RAM the host-filled ``ram_file``) and its destination,
    waiting for ``migrate-incoming``; serial and QMP sockets in ``workdir``."""
    src = QemuGuest(
        image,
        memory,
        cmdline,
        workdir / "qemu-src.serial",
        workdir / "qemu-src.qmp",
        ram_file=ram_file,
    )
    dst = QemuGuest(
        image, memory, cmdline, workdir / "qemu-dst.serial", workdir / "qemu-dst.qmp", incoming=True
    )
    return src, dst


class QemuProcess:
    """A running QEMU with a connected QMP client; killed on exit from the context."""

    def __init__(self, guest: QemuGuest) -> None:
        self.guest = guest
        self.argv = guest.argv()
        for p in (guest.serial, guest.qmp):
            p.unlink(missing_ok=True)
        self._log = open(guest.serial.with_suffix(".stderr"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.qmp = self._connect()
        except BaseException:
            self.kill()
            raise

    def _connect(self) -> QmpClient:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise VmferryError(f"QEMU exited at start ({self.proc.returncode}): {self.log()}")
            if self.guest.qmp.exists():
                with contextlib.suppress(ConnectionRefusedError, FileNotFoundError):
                    return QmpClient(str(self.guest.qmp), timeout=QMP_TIMEOUT_S)
            if time.monotonic() > deadline:
                raise VmferryError(f"QEMU's QMP socket did not open within {START_TIMEOUT_S} s")
            time.sleep(POLL_S)

    def log(self) -> str:
        path = self.guest.serial.with_suffix(".stderr")
        try:
            return path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def execute(self, command: str, **arguments: Any) -> Any:
        return self.qmp.execute(command, **arguments)

    def wait(self, timeout: float) -> int:
        """The exit status; VmferryError (and the process killed) if it runs past timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise VmferryError(f"QEMU did not exit within {timeout:.0f} s") from None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.qmp.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        with contextlib.suppress(AttributeError):
            del self.qmp
        self.guest.qmp.unlink(missing_ok=True)


def event_time(event: dict[str, Any]) -> float:
    """A QMP event's timestamp (wall clock, seconds)."""
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


@dataclass
class QemuMigration:
    """What one QEMU migration reported, and what the benchmark saw around it."""

    status: str
    total_ms: float  # query-migrate total-time (source: start → sent)
    downtime_ms: float  # query-migrate downtime (source: stop → sent)
    setup_ms: float
    stop_to_resume_ms: float  # source STOP event → destination RESUME event
    start_to_resume_ms: float  # `migrate` issued → destination RESUME event
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    round0_rate: float = -1.0  # bytes/s: see round0_rate()


def configure(vm: QemuProcess, channels: int, downtime_limit_ms: int) -> None:
    """The same settings on both sides: multifd with ``channels`` (when > 1), no bandwidth
    cap, the downtime limit. Capabilities must be set before migrate(-incoming)."""
    vm.execute(
        "migrate-set-capabilities",
        capabilities=[{"capability": "multifd", "state": channels > 1}],
    )
    params: dict[str, Any] = {
        "max-bandwidth": UNLIMITED_BANDWIDTH,
        "downtime-limit": downtime_limit_ms,
    }
    if channels > 1:
        params["multifd-channels"] = channels
    vm.execute("migrate-set-parameters", **params)


def round0_rate(polls: list[dict[str, Any]]) -> float:
    """Bytes/s of QEMU's round 0, from its ``query-migrate`` answers polled while it ran.

    QEMU syncs the dirty log once at the start (dirty-sync-count 1) and again when its
    first pass over RAM has ended: the last poll before the second sync saw only round 0's
    bytes, ``ram.transferred`` over ``total-time`` − ``setup-time``. -1 when no poll fell
    in round 0 (it took less than one poll interval)."""
    best = -1.0
    for info in polls:
        ram = info.get("ram", {})
        if info.get("status") != "active" or int(ram.get("dirty-sync-count", 0)) >= 2:
            continue
        took_ms = float(info.get("total-time", 0)) - float(info.get("setup-time", 0))
        nbytes = float(ram.get("transferred", 0))
        if took_ms > 0 and nbytes > 0:
            best = nbytes / (took_ms / 1e3)  # the latest such poll: most of round 0
    return best


def _await_end(
    src: QemuProcess, timeout_s: float
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Poll query-migrate until the migration is over, cancelling it past ``timeout_s``:
    the last answer, every answer (round 0's rate is read from them), the bench's error."""
    deadline = time.monotonic() + timeout_s
    info: dict[str, Any] = {}
    polls: list[dict[str, Any]] = []
    error = ""
    while True:
        info = src.execute("query-migrate")
        polls.append(info)
        if info.get("status") in DONE:
            break
        if time.monotonic() > deadline:
            src.execute("migrate_cancel")
            error = f"not converged within {timeout_s:.0f} s"
            end = time.monotonic() + QMP_TIMEOUT_S
            while info.get("status") not in DONE and time.monotonic() < end:
                time.sleep(POLL_S)
                info = src.execute("query-migrate")
            break
        time.sleep(POLL_S)
    return info, polls, error


def migrate(
    src: QemuProcess,
    dst: QemuProcess,
    port: int,
    timeout_s: float,
    *,
    running: bool,
) -> QemuMigration:
    """Migrate src → dst (both configured, dst's migrate-incoming done) and wait for it.

    Past ``timeout_s`` the migration is cancelled and reported as not converged. A VM
    that was ``running`` resumes on dst by itself (its RESUME event ends the downtime); a
    paused one stays paused there, and the caller decides when to ``cont``.
    """
    src.qmp.events.clear()
    t_issue = time.time()
    src.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
    info, polls, error = _await_end(src, timeout_s)
    status = str(info.get("status", "?"))
    if status != "completed":
        return QemuMigration(
            status,
            float(info.get("total-time", -1)),
            -1.0,
            float(info.get("setup-time", -1)),
            -1.0,
            -1.0,
            info,
            error or str(info.get("error-desc", status)),
        )
    stop_to_resume = start_to_resume = -1.0
    if running:
        stops = [e for e in src.qmp.events if e.get("event") == "STOP"]
        t_resume = event_time(dst.qmp.wait_event("RESUME", QMP_TIMEOUT_S))
        if stops:
            stop_to_resume = (t_resume - event_time(stops[-1])) * 1e3
        start_to_resume = (t_resume - t_issue) * 1e3
    return QemuMigration(
        status,
        float(info.get("total-time", -1)),
        float(info.get("downtime", -1)),
        float(info.get("setup-time", -1)),
        stop_to_resume,
        start_to_resume,
        info,
        round0_rate=round0_rate(polls),
    )
