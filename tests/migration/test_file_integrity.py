"""A file from ``vmferry migrate file: --no-verify`` is checksummed to its last byte: damage
anywhere, pre-copy page data included, is refused in one line before the guest runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RESULT_RE, ROOT, vmferry
from vmferry.migration import codec
from vmferry.qmp.client import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

GUEST = ["memtouch", "--memory", "256M", "--", "wss=32M", "seed=5", "rate=100", "rounds=20"]


def sections(data: bytes) -> list[tuple[bytes, int, int, int]]:
    """(tag, flags, header offset, payload end) of every section."""
    out = []
    pos = codec.STREAM_HEADER_SIZE
    while pos < len(data):
        tag, flags, length, _, _ = codec.SECTION_HEADER.unpack_from(data, pos)
        end = pos + codec.SECTION_HEADER_SIZE + length
        out.append((tag, flags, pos, end))
        pos = end
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running memtouch migrated to a file over QMP, without digests."""
    path = tmp_path_factory.mktemp("file") / "vm.migration"
    qmp = f"/tmp/vmferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.qmp"  # AF_UNIX length
    src = subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", "run", "--qmp", f"unix:{qmp}", *GUEST],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not Path(qmp).exists():
            assert src.poll() is None and time.monotonic() < deadline, src.communicate()
            time.sleep(0.05)
        mig = vmferry("migrate", "--qmp", qmp, "--no-verify", f"file:{path}")
        assert mig.returncode == 0, mig.stderr
        with QmpClient(qmp) as c:  # the source waits paused (postmigrate), as QEMU's does
            assert c.execute("query-status")["status"] == "postmigrate"
            c.execute("quit")
        out, err = src.communicate(timeout=30)
        assert src.returncode == 0, err
        assert not RESULT_RE.search(out), "the guest finished before it was saved"
    finally:
        src.kill()
        src.wait()
    yield path


def restore(path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", "run", "--incoming", f"file:{path}"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )


def refused(path: Path) -> str:
    r = restore(path)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 125, err
    assert r.stdout == b"", "the guest ran"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_the_undamaged_file_restores_and_finishes_the_run(saved: Path) -> None:
    """The control: the file has pre-copy rounds and no digests, and it works."""
    tags = [t for t, _, _, _ in sections(saved.read_bytes())]
    assert codec.ROUND in tags and codec.VRFY not in tags
    r = restore(saved)
    assert r.returncode == 0, r.stderr
    ref = vmferry("run", *GUEST)
    assert RESULT_RE.findall(r.stdout) == RESULT_RE.findall(ref.stdout) != []


def test_a_flipped_byte_in_pre_copy_page_data_is_refused(saved: Path, tmp_path: Path) -> None:
    data = bytearray(saved.read_bytes())
    secs = sections(bytes(data))
    first_round = next(i for i, s in enumerate(secs) if s[0] == codec.ROUND)
    # The biggest RAM section of round 0: pages read while the guest ran.
    i = max(
        range(first_round), key=lambda k: secs[k][3] - secs[k][2] if secs[k][0] == codec.RAM else 0
    )
    tag, flags, start, end = secs[i]
    assert tag == codec.RAM and flags == 0 and end - start > 1 << 20
    data[end - 4096 - 100] ^= 0x20  # inside the data of the last page
    bad = tmp_path / "flipped.migration"
    bad.write_bytes(bytes(data))
    assert refused(bad) == (
        f"vmferry: error: section #{i} RAM at byte {start}: checksum mismatch, the section is "
        "corrupt"
    )


@pytest.mark.parametrize("where", ["mid-page-data", "mid-header", "before-end"])
def test_a_truncated_file_is_refused(saved: Path, tmp_path: Path, where: str) -> None:
    data = saved.read_bytes()
    secs = sections(data)
    ram = next(s for s in secs if s[0] == codec.RAM)
    cut = {
        "mid-page-data": (ram[2] + ram[3]) // 2,
        "mid-header": ram[2] + 10,
        "before-end": secs[-1][2],
    }[where]
    bad = tmp_path / "truncated.migration"
    bad.write_bytes(data[:cut])
    msg = refused(bad)
    assert ("is truncated" in msg or "stream ends before section" in msg) and "#" in msg, msg


def test_bytes_after_the_end_are_refused(saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "longer.migration"
    bad.write_bytes(saved.read_bytes() + b"\0" * 7)
    assert refused(bad).endswith(
        f"7 bytes after its END section at byte {saved.stat().st_size} (corrupt file?)"
    )
