"""`vmferry migrate --postcopy` / `--postcopy-after` / `--dest-qmp`, and `--max-bandwidth`
with a size: what the CLI asks of each side's QMP (fake VMs behind real sockets), and
what it refuses before it asks anything (one line, exit 125)."""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from tests.cli.test_migrate_errors import one_error_line
from tests.conftest import vmferry
from tests.qmp.fakes import FakeVm
from vmferry.cli import main as cli_main
from vmferry.cli.migrate_view import progress as _progress
from vmferry.cli.migrate_view import summary as _summary
from vmferry.qmp import QmpError, QmpServer

REPORT: dict[str, Any] = {
    "status": "completed",
    "total-time": 2100,
    "downtime": 12,
    "ram": {"transferred": 300 << 20, "dirty-sync-count": 1},
    "rounds": [],
    "convergence": "switched to post-copy: asked by migrate-start-postcopy (after 1 round, 0.9 s)",
    "postcopy": {
        "active": True,
        "switch-time": 0.91,
        "requests": 37,
        "bytes": 120 << 20,
        "urgent-pages": 41,
        "pushed-pages": 30679,
        "owed-pages": 30720,
        "blocktime": 18.25,
        "vcpu-blocktime": [18.25],
        "latency": {"p50": 0.31, "p99": 2.2, "max": 3.4},
        "recoveries": 0,
        "complete-time": 2.05,
    },
}


class MigratingVm(FakeVm):
    """A source whose migration completes at once; `refuse_postcopy` says no to it."""

    def __init__(self, refuse_postcopy: str = "") -> None:
        super().__init__()
        self.refuse_postcopy = refuse_postcopy

    def migrate(self, uri: str, detach: bool = True, resume: bool = False) -> None:
        super().migrate(uri, detach, resume)
        self.migration = {"status": "completed", "ram": {}}

    def migrate_start_postcopy(self) -> None:
        super().migrate_start_postcopy()
        if self.refuse_postcopy:
            raise QmpError(self.refuse_postcopy)

    def migrate_cancel(self) -> None:
        super().migrate_cancel()

    def x_query_migrate_report(self) -> dict[str, Any]:
        super().x_query_migrate_report()
        return REPORT


def _path() -> str:
    return f"/tmp/vmferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.qmp"


@pytest.fixture
def source() -> Iterator[tuple[str, MigratingVm]]:
    vm, path = MigratingVm(), _path()
    with QmpServer(path, vm):
        yield path, vm


@pytest.fixture
def destination() -> Iterator[tuple[str, FakeVm]]:
    vm, path = FakeVm(), _path()
    with QmpServer(path, vm):
        yield path, vm


def _calls(vm: FakeVm, name: str) -> list[dict[str, Any]]:
    return [args for method, args in vm.calls if method == name]


def _caps(vm: FakeVm) -> dict[str, bool]:
    merged: dict[str, bool] = {}
    for call in _calls(vm, "migrate_set_capabilities"):
        merged.update(call["caps"])
    return merged


def _migrate(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli_main.main(["migrate", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_postcopy_sets_both_sides_and_starts_after_migrate(
    source: tuple[str, MigratingVm],
    destination: tuple[str, FakeVm],
    capsys: pytest.CaptureFixture[str],
) -> None:
    src_path, src = source
    dst_path, dst = destination
    status, out, err = _migrate(
        "--qmp", src_path, "tcp:127.0.0.1:4444", "--postcopy", "--dest-qmp", f"unix:{dst_path}",
        "--max-bandwidth", "200M", capsys=capsys,
    )  # fmt: skip
    assert status == 0, err
    assert _caps(src)["postcopy-ram"] and _caps(src)["postcopy-blocktime"]
    assert _caps(dst) == {"postcopy-ram": True, "postcopy-blocktime": True}
    # 200M is 200 MiB/s, in bytes as QMP's max-bandwidth counts them.
    assert _calls(src, "migrate_set_parameters") == [{"params": {"max-bandwidth": 200 << 20}}]
    # The switch is asked for right after migrate: the engine makes it when round 0 ends.
    order = [m for m, _ in src.calls if m in ("migrate", "migrate_start_postcopy")]
    assert order == ["migrate", "migrate_start_postcopy"]
    # The summary says what post-copy did.
    assert "post-copy: page requests" in out and "37 (41 pages sent for them)" in out
    assert "p99 2.20 ms" in out


def test_postcopy_after_leaves_the_switch_to_the_policy(
    source: tuple[str, MigratingVm], capsys: pytest.CaptureFixture[str]
) -> None:
    path, vm = source
    status, _, err = _migrate(
        "--qmp", path, "tcp:127.0.0.1:4444", "--postcopy-after", "5,30s", capsys=capsys
    )
    assert status == 0, err
    assert _caps(vm)["postcopy-ram"]  # implied
    assert _calls(vm, "migrate_set_parameters") == [{"params": {"x-postcopy-after": "5,30s"}}]
    assert _calls(vm, "migrate_start_postcopy") == []


def test_without_postcopy_the_capability_is_cleared(
    source: tuple[str, MigratingVm], capsys: pytest.CaptureFixture[str]
) -> None:
    path, vm = source
    vm.capabilities["postcopy-ram"] = True  # left set by an earlier run
    status, _, err = _migrate("--qmp", path, "tcp:127.0.0.1:4444", capsys=capsys)
    assert status == 0, err
    assert _caps(vm)["postcopy-ram"] is False
    assert _calls(vm, "migrate_start_postcopy") == []


def test_a_refused_start_cancels_the_migration_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    why = "migrate-start-postcopy: the migration is already switching over"
    vm, path = MigratingVm(refuse_postcopy=why), _path()
    with QmpServer(path, vm):
        status, _, err = _migrate("--qmp", path, "tcp:127.0.0.1:4444", "--postcopy", capsys=capsys)
    assert status == 125
    assert (
        err.strip() == f"vmferry: error: {why} (the migration was cancelled: the VM runs on here)"
    )
    assert _calls(vm, "migrate_cancel") == [{}]


def test_an_unreachable_destination_socket_stops_before_migrate(
    source: tuple[str, MigratingVm], capsys: pytest.CaptureFixture[str]
) -> None:
    path, vm = source
    status, _, err = _migrate(
        "--qmp", path, "tcp:127.0.0.1:4444", "--postcopy", "--dest-qmp", "/tmp/no-such.qmp",
        capsys=capsys,
    )  # fmt: skip
    assert status == 125
    assert "--dest-qmp: cannot reach the destination's QMP socket /tmp/no-such.qmp" in err
    assert _calls(vm, "migrate") == []


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--max-bandwidth", "200X"], "--max-bandwidth 200X: cannot read size '200X'"),
        (["--max-bandwidth", "1.5"], "--max-bandwidth 1.5: size '1.5' is not a whole number"),
        (["--postcopy-after", "soon"], "x-postcopy-after = 'soon': cannot read 'soon'"),
        (["--postcopy-after", "0"], "x-postcopy-after = '0': 0 rounds is out of range"),
        (["--dest-qmp", "/tmp/d.qmp"], "--dest-qmp is used only with --postcopy"),
        (["--postcopy", "--verify", "strict"], "--postcopy with --verify strict"),
    ],
)
def test_bad_options_are_one_line_before_anything_is_asked(argv: list[str], words: str) -> None:
    # The socket does not exist: a refusal that came after connecting would say so.
    r = vmferry("migrate", "--qmp", "/tmp/vmferry-no-such.qmp", "tcp:127.0.0.1:1", *argv)
    one_error_line(r, words)


def test_postcopy_to_a_file_is_refused(tmp_path: Any) -> None:
    r = vmferry("migrate", "--qmp", "/tmp/vmferry-no-such.qmp", f"file:{tmp_path}/x", "--postcopy")
    one_error_line(r, "--postcopy: file:", "is a file; post-copy needs a destination VM")


def _render(thing: Any) -> str:
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(thing)
    return out.getvalue()


def test_progress_in_post_copy_and_when_the_link_broke() -> None:
    info = {
        "status": "postcopy-active",
        "ram": {"postcopy-requests": 12, "postcopy-bytes": 3 << 20},
        "postcopy-blocktime": 7,
    }
    text = _render(_progress(info))
    assert re.search(r"page requests +12 +sent in post-copy +3 MiB", text), text
    assert re.search(r"vCPU blocktime +7 ms", text), text
    assert "link broken" not in text
    text = _render(_progress({**info, "status": "postcopy-paused"}))
    assert "link broken: run migrate-recover URI on the destination" in text
    assert "page requests" not in _render(_progress({"status": "active"}))


def test_summary_without_post_copy_has_no_post_copy_rows() -> None:
    out = io.StringIO()
    _summary(Console(file=out, width=120, color_system=None), {**REPORT, "postcopy": {}})
    assert "post-copy" not in out.getvalue().replace("switched to post-copy", "")
