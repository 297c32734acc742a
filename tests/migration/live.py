"""Helpers shared by the live-migration tests: workloads and their reference RESULTs, a
source VM and a destination in this process, vmferry processes, and a TCP proxy that can
cut a connection.

A memtouch RESULT depends only on the guest's parameters and its vCPU count (memtouch.c
mixes neither ``rate=`` nor the RAM size in; ``rate`` only paces the guest), so the
reference is the same run without pacing: it takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import RESULT_RE, ROOT, Completed, vmferry
from vmferry.machine import Machine, MachineConfig, parse_size
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.destination import IncomingResult
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.migration.tls import TlsServer
from vmferry.qmp.client import QmpClient
from vmferry.testing.harness import InProcessDestination

MEMORY = 256 << 20
MIGRATION_TIMEOUT_S = 60.0
GUEST_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Workload:
    """memtouch's parameters; ``rounds × wss / rate`` is how long it runs (rate in MB/s)."""

    wss: str = "32M"
    seed: int = 1
    rounds: int = 6
    rate: int = 64
    pattern: str = "random"
    vcpus: int = 2
    memory: int = MEMORY

    def args(self, *, paced: bool = True) -> str:
        s = f"wss={self.wss} pattern={self.pattern} seed={self.seed} rounds={self.rounds}"
        return f"{s} rate={self.rate}" if paced and self.rate else s

    def config(self) -> MachineConfig:
        return MachineConfig(
            memory=self.memory, vcpus=self.vcpus, image="memtouch", cmdline=self.args()
        )

    def run_args(self) -> list[str]:
        """``vmferry run`` arguments that boot this workload."""
        return [
            "run",
            "memtouch",
            "--memory",
            f"{self.memory >> 20}M",
            "--vcpus",
            str(self.vcpus),
            "--",
            self.args(),
        ]


_references: dict[tuple[str, int], str] = {}


def reference_result(w: Workload) -> str:
    """The RESULT of the workload run to its end without migration (cached)."""
    key = (w.args(paced=False), w.vcpus)
    if key not in _references:
        r = vmferry(
            "run",
            "memtouch",
            "--memory",
            f"{w.memory >> 20}M",
            "--vcpus",
            str(w.vcpus),
            "--",
            w.args(paced=False),
        )
        assert r.returncode == 0, r.stderr
        assert r.result is not None, r.stdout
        _references[key] = r.result
    return _references[key]


def result_in(output: bytes) -> str | None:
    found = RESULT_RE.findall(output)
    return found[-1].decode() if found else None


# ---- in this process


class Guest:
    """A memtouch VM booted and running in this process, its serial output captured."""

    def __init__(self, w: Workload, *, warm: bool = True) -> None:
        self.workload = w
        self.serial = io.BytesIO()
        self.machine = Machine.boot(w.config(), serial=self.serial)
        self.machine.start()
        if warm:
            # Round 0 of memtouch fills the working set: migrate a full one, not a fresh VM.
            wss_pages = parse_size(w.wss) // PAGE_SIZE
            wait_until(
                lambda: self.machine.memory.resident_pages().size > wss_pages,
                30,
                "the guest to fill its working set",
            )

    def finish(self) -> str:
        """Wait for the guest to end here; its RESULT."""
        ex = self.machine.wait(GUEST_TIMEOUT_S)
        assert ex is not None, "the source guest did not finish"
        assert ex.error is None and ex.code == 0, ex
        result = result_in(self.serial.getvalue())
        assert result is not None, self.serial.getvalue()
        return result

    def close(self) -> None:
        self.machine.close()


def assert_source_intact(guest: Guest, *, finish: bool = True) -> None:
    """After a failed migration the source VM runs on, as if nothing happened: not paused,
    no dirty log, no throttle; and it ends with the reference RESULT."""
    m = guest.machine
    assert m.exit is None, f"the source guest ended ({m.exit}) before the migration failed"
    assert not m.paused, "the source VM was left paused"
    assert not m.dirty_logging, "the source VM was left with the dirty log on"
    assert m.throttle_pct == 0, "the source VM was left throttled"
    if finish:
        assert guest.finish() == reference_result(guest.workload)


class Destination(InProcessDestination):
    """The harness's destination (tcp:127.0.0.1:<free port>, receiving on its own thread)
    with the tests' checks: it must fail, or it runs the guest to its end."""

    def __init__(self, *, tls: TlsServer | None = None) -> None:
        super().__init__(tls=tls, thread_name="test-destination")

    def join(self, timeout: float = MIGRATION_TIMEOUT_S) -> None:
        assert self.wait(timeout), f"the destination still runs after {timeout} s"

    def failure(self, timeout: float = MIGRATION_TIMEOUT_S) -> BaseException:
        """The destination's error (it must fail, and must not have started a guest)."""
        self.join(timeout)
        assert self.result is None, "the destination took over a VM it should have refused"
        assert self.error is not None
        return self.error

    def finish(self) -> tuple[IncomingResult, str]:
        """The migration arrived: run the guest here to its end; its RESULT."""
        self.join()
        if self.error is not None:
            raise AssertionError(f"the destination failed: {self.error!r}") from self.error
        assert self.result is not None
        m = self.result.machine
        try:
            ex = m.wait(GUEST_TIMEOUT_S)
            assert ex is not None, "the migrated guest did not finish"
            assert ex.error is None and ex.code == 0, ex
        finally:
            m.close()
        result = result_in(self.serial.getvalue())
        assert result is not None, self.serial.getvalue()
        return self.result, result


@dataclass
class Events:
    """What a MigrationSource reported, with a hook run (on the migration thread) per event."""

    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    hook: Callable[[str, dict[str, Any]], None] | None = None

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.seen.append((name, data))
        if self.hook is not None:
            self.hook(name, data)

    def statuses(self) -> list[str]:
        return [d["status"] for n, d in self.seen if n == "MIGRATION"]


def start_migration(
    guest: Guest,
    uri: str,
    params: MigrationParameters | None = None,
    caps: MigrationCapabilities | None = None,
    events: Events | None = None,
) -> MigrationSource:
    src = MigrationSource(
        guest.machine,
        uri,
        params or MigrationParameters(),
        caps or MigrationCapabilities(),
        on_event=events,
    )
    src.start()
    return src


def wait_migration(src: MigrationSource, timeout: float = MIGRATION_TIMEOUT_S) -> None:
    assert src.wait(timeout), f"the migration did not end within {timeout} s"


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


# ---- vmferry processes


class Proc:
    """A vmferry process whose stdout and stderr are collected as they come."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        """``prefix``: a command that runs vmferry (``ip netns exec NS``, say)."""
        self.args = args
        self.p = subprocess.Popen(
            [*prefix, sys.executable, "-m", "vmferry.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        self.out = bytearray()
        self.err = bytearray()
        self._cond = threading.Condition()
        assert self.p.stdout is not None and self.p.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(f, buf), daemon=True)
            for f, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))
        ]
        for t in self._readers:
            t.start()

    def _pump(self, f: io.BufferedReader, buf: bytearray) -> None:
        while chunk := f.read1(65536):
            with self._cond:
                buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_stderr(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` in stderr, waiting for it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self.err.decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self._alive_readers()):
                    raise AssertionError(
                        f"no {pattern!r} on the stderr of vmferry {' '.join(self.args)}: "
                        f"{self.err.decode(errors='replace')}"
                    )
                self._cond.wait(min(left, 0.2))

    def _alive_readers(self) -> bool:
        return any(t.is_alive() for t in self._readers)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.send_signal(signal.SIGKILL)

    def finish(self, timeout: float = GUEST_TIMEOUT_S) -> Completed:
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.p.wait()
            raise AssertionError(
                f"vmferry {' '.join(self.args)} still ran after {timeout} s; stderr: "
                f"{self.err.decode(errors='replace')}"
            ) from None
        for t in self._readers:
            t.join(10)
        return Completed(self.p.returncode, bytes(self.out), self.err.decode(errors="replace"))


def start_destination_process() -> tuple[Proc, int]:
    """``vmferry run --incoming tcp:127.0.0.1:0``: the process and the port it listens on."""
    p = Proc("run", "--incoming", "tcp:127.0.0.1:0")
    m = p.wait_stderr(r"waiting for a migration on 127\.0\.0\.1:(\d+)")
    return p, int(m.group(1))


@contextlib.contextmanager
def qmp_dir() -> Iterator[Path]:
    # pytest's tmp_path can pass the 107-byte limit of a Unix socket path.
    d = tempfile.mkdtemp(prefix="vmferry-live-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start_source_process(w: Workload, qmp_path: Path) -> Proc:
    """``vmferry run memtouch … --qmp unix:PATH``, once its QMP socket answers."""
    args = w.run_args()
    i = args.index("--")
    p = Proc(*args[:i], "--qmp", f"unix:{qmp_path}", *args[i:])
    deadline = time.monotonic() + 30
    while True:
        if qmp_path.exists():
            with contextlib.suppress(OSError), QmpClient(str(qmp_path), timeout=5):
                return p
        if p.p.poll() is not None or time.monotonic() > deadline:
            res = p.finish(1)
            raise AssertionError(f"the source vmferry did not open its QMP socket: {res.stderr}")
        time.sleep(0.02)


# ---- a TCP proxy


class Proxy:
    """Forwards every connection to 127.0.0.1:``target``; ``cut`` resets them (RST both ways,
    as when a link or a middlebox dies), optionally once connection ``conn`` (in accept
    order) has carried ``after`` bytes from the client."""

    def __init__(self, target: int, *, conn: int | None = None, after: int = 0) -> None:
        self.target = target
        self.cut_conn = conn
        self.cut_after = after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.forwarded: list[int] = []
        self.was_cut = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                index = len(self.pairs)
                self.pairs.append((client, server))
                self.forwarded.append(0)
            for a, b, up in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(a, b, index if up else None), daemon=True
                ).start()

    def _pump(self, a: socket.socket, b: socket.socket, index: int | None) -> None:
        buf = bytearray(1 << 16)
        try:
            while True:
                limit = len(buf)
                if index is not None and index == self.cut_conn:
                    limit = min(limit, self.cut_after - self.forwarded[index])
                    if limit <= 0:
                        self.cut()
                        return
                n = a.recv_into(buf, limit)
                if n == 0:
                    if self.was_cut.is_set():
                        return
                    with contextlib.suppress(OSError):
                        b.shutdown(socket.SHUT_WR)
                    return
                b.sendall(memoryview(buf)[:n])
                if index is not None:
                    self.forwarded[index] += n
        except OSError:
            return

    def cut(self) -> None:
        self.was_cut.set()
        with self._lock:
            socks = [s for pair in self.pairs for s in pair]
        for s in socks:
            # Linger 0: close sends RST. SHUT_RD wakes a pump blocked in recv (it holds the
            # socket open) without sending anything.
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)
        for s in socks:
            s.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for pair in self.pairs:
                for s in pair:
                    s.close()


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
