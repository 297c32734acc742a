"""The bench's child processes: a VMM process with its stderr collected, waiting for
what it prints, a free port, a vmferry destination listening on one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vmferry.bench.migrate_plan import GUEST_END_TIMEOUT_S, RESULT_RE, START_TIMEOUT_S, VMFERRY
from vmferry.errors import VmferryError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise VmferryError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def has(path: Path, needle: bytes) -> bool:
    try:
        return needle in path.read_bytes()
    except FileNotFoundError:
        return False


def last_result(path: Path) -> str:
    try:
        found = RESULT_RE.findall(path.read_bytes())
    except FileNotFoundError:
        return ""
    return found[-1].decode() if found else ""


class Proc:
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

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def vmferry_destination(port: int, serial: Path) -> Proc:
    dst = Proc(
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
        wait_for(
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


__all__ = ["Proc", "free_port", "has", "last_result", "vmferry_destination", "wait_for"]
