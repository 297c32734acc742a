"""Shared fixtures: KVM/root checks that skip with a reason, built guest images, the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUEST_BUILD = ROOT / "guests" / "build"
RESULT_RE = re.compile(rb"^RESULT ([0-9a-f]{16})$", re.MULTILINE)


def kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to use /dev/kvm"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kvm_reason = kvm_unusable_reason()
    root_reason = None if os.geteuid() == 0 else "needs root"
    for item in items:
        if kvm_reason and "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=kvm_reason))
        if root_reason and "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=root_reason))


def guest_image(name: str) -> Path:
    path = GUEST_BUILD / f"{name}.elf"
    if not path.is_file():
        pytest.fail(f"guest image {path} is not built: run 'make guests'")
    return path


@dataclass
class Completed:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def result(self) -> str | None:
        m = RESULT_RE.findall(self.stdout)
        return m[-1].decode() if m else None


def vmferry(*args: str, timeout: float = 120) -> Completed:
    """Run the vmferry CLI in a new process, as a user would."""
    p = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
    )
    return Completed(p.returncode, p.stdout, p.stderr.decode(errors="replace"))


def start_vmferry(*args: str) -> subprocess.Popen[bytes]:
    """Start the vmferry CLI in a new process and leave it running (stdout, stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def unix_socket_path() -> Iterator[str]:
    """A fresh path for a QMP socket, removed afterwards. AF_UNIX paths are limited to 107
    bytes, and pytest's tmp_path can be longer."""
    path = f"/tmp/vmferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.qmp"
    yield path
    if os.path.lexists(path):
        os.unlink(path)


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """A non-daemon thread a test leaves running would keep the interpreter (and CI) from
    exiting: fail the test that leaked it instead."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before
            and t.is_alive()
            and not t.daemon
            and not t.name.startswith(("ThreadPoolExecutor", "digest"))
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"the test left non-daemon threads running: {[t.name for t in leaked]}"
