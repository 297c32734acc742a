"""`human-monitor-command`'s text, checked against what QEMU 7.2 printed for the same
query-migrate and query-status replies (recorded from qemu-system-x86_64 7.2.22)."""

from __future__ import annotations

from typing import Any

import pytest

from vmferry.qmp import QmpError, hmp

# QEMU 7.2's query-migrate during a migration capped at 100 KB/s, and its `info migrate`
# (less the "globals:" block QEMU prints first; vmferry has no migration globals).
QEMU_ACTIVE: dict[str, Any] = {
    "expected-downtime": 300,
    "status": "active",
    "setup-time": 0,
    "total-time": 1501,
    "ram": {
        "total": 286072832,
        "postcopy-requests": 0,
        "dirty-sync-count": 1,
        "multifd-bytes": 0,
        "pages-per-second": 11110,
        "downtime-bytes": 0,
        "page-size": 4096,
        "remaining": 257720320,
        "postcopy-bytes": 0,
        "mbps": 0.80136,
        "transferred": 168895,
        "dirty-sync-missed-zero-copy": 0,
        "precopy-bytes": 168895,
        "duplicate": 6896,
        "dirty-pages-rate": 0,
        "skipped": 0,
        "normal-bytes": 106496,
        "normal": 26,
    },
}
QEMU_ACTIVE_TEXT = (
    "Migration status: active\r\ntotal time: 1501 ms\r\nexpected downtime: 300 ms\r\n"
    "setup: 0 ms\r\ntransferred ram: 164 kbytes\r\nthroughput: 0.80 mbps\r\n"
    "remaining ram: 251680 kbytes\r\ntotal ram: 279368 kbytes\r\nduplicate: 6896 pages\r\n"
    "skipped: 0 pages\r\nnormal: 26 pages\r\nnormal bytes: 104 kbytes\r\n"
    "dirty sync count: 1\r\npage size: 4 kbytes\r\nmultifd bytes: 0 kbytes\r\n"
    "pages-per-second: 11110\r\nprecopy ram: 164 kbytes\r\n"
)
QEMU_COMPLETED: dict[str, Any] = {
    "status": "completed",
    "setup-time": 0,
    "downtime": 2,
    "total-time": 703,
    "ram": {
        **QEMU_ACTIVE["ram"],
        "total": 151855104,
        "dirty-sync-count": 3,
        "pages-per-second": 250,
        "downtime-bytes": 825272,
        "remaining": 0,
        "mbps": 13.04281081081081,
        "transferred": 825272,
        "precopy-bytes": 0,
        "duplicate": 36954,
        "normal-bytes": 491520,
        "normal": 120,
    },
}
QEMU_COMPLETED_TEXT = (
    "Migration status: completed\r\ntotal time: 703 ms\r\ndowntime: 2 ms\r\nsetup: 0 ms\r\n"
    "transferred ram: 805 kbytes\r\nthroughput: 13.04 mbps\r\nremaining ram: 0 kbytes\r\n"
    "total ram: 148296 kbytes\r\nduplicate: 36954 pages\r\nskipped: 0 pages\r\n"
    "normal: 120 pages\r\nnormal bytes: 480 kbytes\r\ndirty sync count: 3\r\n"
    "page size: 4 kbytes\r\nmultifd bytes: 0 kbytes\r\npages-per-second: 250\r\n"
    "downtime ram: 805 kbytes\r\n"
)


@pytest.mark.parametrize(
    ("info", "text"),
    [(QEMU_ACTIVE, QEMU_ACTIVE_TEXT), (QEMU_COMPLETED, QEMU_COMPLETED_TEXT)],
    ids=["active", "completed"],
)
def test_info_migrate_is_qemus_text(info: dict[str, Any], text: str) -> None:
    assert hmp.info_migrate(info) == text


def test_info_migrate_failed_names_the_error_and_nothing_before_a_migration() -> None:
    failed = {"status": "failed", "error-desc": "Unable to write to socket: Connection reset"}
    assert hmp.info_migrate(failed) == (
        "Migration status: failed (Unable to write to socket: Connection reset)\r\n"
        "total time: 0 ms\r\n"
    )
    assert hmp.info_migrate({}) == ""


def test_info_migrate_shows_device_state_and_throttle() -> None:
    info = {
        **QEMU_ACTIVE,
        "vfio": {"transferred": 4 << 20},
        "cpu-throttle-percentage": 30,
    }
    lines = hmp.info_migrate(info).split("\r\n")
    assert "vfio device transferred: 4096 kbytes" in lines
    assert lines[-2] == "cpu throttle percentage: 30"


@pytest.mark.parametrize(
    ("status", "text"),
    [
        ({"running": True, "status": "running"}, "VM status: running\r\n"),
        ({"running": False, "status": "paused"}, "VM status: paused\r\n"),
        ({"running": False, "status": "postmigrate"}, "VM status: paused (postmigrate)\r\n"),
        ({"running": False, "status": "inmigrate"}, "VM status: paused (inmigrate)\r\n"),
    ],
)
def test_info_status_is_qemus_text(status: dict[str, Any], text: str) -> None:
    assert hmp.info_status(status) == text


def test_run_dispatches_and_answers_unknown_commands_as_qemu() -> None:
    def status() -> dict[str, Any]:
        return {"running": True, "status": "running"}

    def migrate() -> dict[str, Any]:
        return {}

    def run(line: str) -> str:
        return hmp.run(line, query_status=status, query_migrate=migrate)

    assert run("  info   status  ") == "VM status: running\r\n"
    assert run("info migrate") == ""
    assert run("foo") == "unknown command: 'foo'\r\n"
    assert run("info foo") == "unknown command: 'info foo'\r\n"
    assert run("info").splitlines()[0] == "info migrate  -- show migration status"


def test_info_migrate_in_post_copy_prints_qemus_post_copy_lines() -> None:
    info = {
        "status": "postcopy-active",
        "total-time": 4000,
        "downtime": 40,
        "ram": {**QEMU_ACTIVE["ram"], "postcopy-requests": 37, "postcopy-bytes": 5 << 20},
        "postcopy-blocktime": 13,
        "postcopy-vcpu-blocktime": [8, 4],
    }
    lines = hmp.info_migrate(info).split("\r\n")
    assert lines[0] == "Migration status: postcopy-active"
    # QEMU 7.2's order: the request count after the dirty rate, postcopy ram after
    # downtime ram, the blocktimes near the end.
    i = lines.index("postcopy request count: 37")
    assert lines.index("precopy ram: 164 kbytes") == i + 1
    assert lines.index("postcopy ram: 5120 kbytes") > i
    assert lines[-3:] == ["postcopy blocktime: 13", "postcopy vcpu blocktime: 8,4", ""]
    # Zero requests and bytes print nothing, as QEMU's.
    assert "postcopy" not in hmp.info_migrate(QEMU_ACTIVE)


def test_post_copy_commands_run_their_qmp_commands() -> None:
    ran: list[tuple[str, ...]] = []

    def refuse() -> None:
        raise QmpError("migrate-pause is currently only supported during postcopy-active")

    actions: dict[str, hmp.Action] = {
        "migrate_start_postcopy": lambda: ran.append(("start",)),
        "migrate_pause": refuse,
        "migrate_recover": lambda uri: ran.append(("recover", uri)),
    }

    def run(line: str) -> str:
        return hmp.run(line, query_status=dict, query_migrate=dict, actions=actions)

    assert run("migrate_start_postcopy") == ""
    assert run("migrate_recover tcp:127.0.0.1:5555") == ""
    assert ran == [("start",), ("recover", "tcp:127.0.0.1:5555")]
    assert run("migrate_pause") == (
        "Error: migrate-pause is currently only supported during postcopy-active\r\n"
    )
    assert run("migrate_recover") == "Error: migrate_recover takes one argument: uri\r\n"
    assert run("migrate_pause now") == "Error: migrate_pause takes no arguments\r\n"
    # Without the actions (a monitor that has none) they are unknown commands.
    assert hmp.run("migrate_pause", query_status=dict, query_migrate=dict) == (
        "unknown command: 'migrate_pause'\r\n"
    )
