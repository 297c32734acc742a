"""QmpServer against QEMU's own client library (qemu.qmp), over a real Unix socket."""

from __future__ import annotations

import asyncio
import os
import stat
from typing import Any

from qemu.qmp import QMPClient

from tests.qmp.fakes import FakeVm
from tests.qmp.wire import RawConnection, error_of, status, with_qmp
from vmferry import __version__
from vmferry.qmp import QmpServer
from vmferry.qmp.schema import COMMANDS

# --- handshake -------------------------------------------------------------------------


def test_greeting_as_qemu_sends_it(server: QmpServer) -> None:
    raw = RawConnection(server.path)
    try:
        assert raw.greeting == {
            "QMP": {
                "version": {
                    "qemu": {"micro": 0, "minor": 0, "major": 0},
                    "package": f"vmferry {__version__}",
                },
                "capabilities": [],
            }
        }
    finally:
        raw.close()


def test_qemu_qmp_connects_and_negotiates(server: QmpServer) -> None:
    async def body(qmp: QMPClient) -> None:
        assert qmp.greeting is not None
        assert qmp.greeting.QMP.capabilities == []
        assert qmp.greeting.QMP.version["package"] == f"vmferry {__version__}"
        assert await qmp.execute("query-status") == {
            "running": True,
            "status": "running",
            "singlestep": False,
        }

    with_qmp(server.path, body)


def test_commands_refused_until_negotiation(server: QmpServer, vm: FakeVm) -> None:
    expecting = ("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")

    async def body(qmp: QMPClient) -> None:
        assert await error_of(qmp, "query-status") == expecting
        assert await error_of(qmp, "no-such-command") == expecting
        assert await error_of(qmp, "qmp_capabilities", {"enable": ["oob"]}) == (
            "GenericError",
            "Capability 'oob' not available",
        )
        assert await qmp.execute("qmp_capabilities") == {}
        assert await error_of(qmp, "qmp_capabilities") == (
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
        )
        assert (await status(qmp))["running"] is True

    with_qmp(server.path, body, negotiate=False)
    assert vm.calls == [("query_status", {})]


# --- every command ---------------------------------------------------------------------


def test_run_state_commands(server: QmpServer, vm: FakeVm) -> None:
    async def body(qmp: QMPClient) -> None:
        assert await qmp.execute("stop") == {}
        assert await qmp.execute("query-status") == {
            "running": False,
            "status": "paused",
            "singlestep": False,
        }
        assert await qmp.execute("cont") == {}
        assert (await status(qmp))["status"] == "running"
        assert await qmp.execute("quit") == {}

    with_qmp(server.path, body)
    assert [name for name, _ in vm.calls] == [
        "stop",
        "query_status",
        "cont",
        "query_status",
        "quit",
    ]


def test_migration_commands(server: QmpServer, vm: FakeVm) -> None:
    async def body(qmp: QMPClient) -> None:
        assert await qmp.execute("migrate", {"uri": "unix:/tmp/x"}) == {}
        assert await qmp.execute("query-migrate") == {"status": "active"}
        assert await qmp.execute("migrate_cancel") == {}
        assert await qmp.execute("query-migrate") == {"status": "cancelled"}
        await qmp.execute("migrate", {"uri": "tcp:h:1", "detach": False, "resume": True})
        await qmp.execute("migrate-incoming", {"uri": "file:/tmp/vm.state"})

    with_qmp(server.path, body)
    # Only the arguments the client gave are passed: the backend's defaults apply.
    assert ("migrate", {"uri": "unix:/tmp/x", "detach": True, "resume": False}) in vm.calls
    assert ("migrate", {"uri": "tcp:h:1", "detach": False, "resume": True}) in vm.calls
    assert vm.calls[-1] == ("migrate_incoming", {"uri": "file:/tmp/vm.state"})


def test_migration_parameters(server: QmpServer, vm: FakeVm) -> None:
    new = {
        "downtime-limit": 2_000_000,
        "max-bandwidth": 0,
        "multifd-channels": 255,
        "multifd-compression": "zstd",
        "cpu-throttle-initial": 1,
        "cpu-throttle-increment": 99,
        "max-cpu-throttle": 50,
        "tls-creds": "/etc/vmferry/tls",
        "tls-hostname": "db.example",
        "tls-authz": "src-a,src-b",
        "x-switchover-timeout": 1500,
        "x-switchover-policy": "cancel",
        "x-peer-timeout": 600_000,
        "x-verify": "strict",
        "x-postcopy-after": "5,30s",
    }

    async def body(qmp: QMPClient) -> None:
        assert await qmp.execute("migrate-set-parameters", new) == {}
        assert await qmp.execute("migrate-set-parameters", {}) == {}
        assert await qmp.execute("query-migrate-parameters") == new

    with_qmp(server.path, body)
    assert ("migrate_set_parameters", {"params": new}) in vm.calls
    assert ("migrate_set_parameters", {"params": {}}) in vm.calls


def test_migration_capabilities(server: QmpServer, vm: FakeVm) -> None:
    async def body(qmp: QMPClient) -> Any:
        caps = [
            {"capability": "multifd", "state": True},
            {"capability": "x-verify", "state": True},
        ]
        assert await qmp.execute("migrate-set-capabilities", {"capabilities": caps}) == {}
        return await qmp.execute("query-migrate-capabilities")

    assert with_qmp(server.path, body) == [
        {"capability": "auto-converge", "state": False},
        {"capability": "multifd", "state": True},
        {"capability": "x-verify", "state": True},
        {"capability": "x-verify-hold-output", "state": False},
        {"capability": "postcopy-ram", "state": False},
        {"capability": "postcopy-blocktime", "state": False},
    ]
    assert ("migrate_set_capabilities", {"caps": {"multifd": True, "x-verify": True}}) in vm.calls


def test_query_commands_and_version(server: QmpServer) -> None:
    async def body(qmp: QMPClient) -> tuple[Any, Any]:
        return await qmp.execute("query-commands"), await qmp.execute("query-version")

    commands, version = with_qmp(server.path, body)
    assert sorted(c["name"] for c in commands) == sorted(COMMANDS)
    assert version == {
        "qemu": {"micro": 0, "minor": 0, "major": 0},
        "package": f"vmferry {__version__}",
    }


def test_query_commands_lists_only_what_the_backend_has(sock_path: str) -> None:
    class StatusOnly:
        def query_status(self) -> dict[str, Any]:
            return {"running": True, "status": "running"}

    async def body(qmp: QMPClient) -> tuple[Any, Any]:
        return await qmp.execute("query-commands"), await error_of(qmp, "stop")

    with QmpServer(sock_path, StatusOnly()) as srv:  # type: ignore[arg-type]
        commands, stop_error = with_qmp(srv.path, body)
    assert {c["name"] for c in commands} == {
        "qmp_capabilities",
        "query-commands",
        "query-version",
        "query-status",
    }
    assert stop_error == ("CommandNotFound", "The command stop has not been found")


# --- events ----------------------------------------------------------------------------


def test_events_reach_negotiated_clients(server: QmpServer) -> None:
    async def body(qmp: QMPClient) -> Any:
        await qmp.execute("query-status")  # the session is surely registered by now
        server.emit("MIGRATION", {"status": "active"})
        server.emit("STOP")
        return [await asyncio.wait_for(qmp.events.get(), 5) for _ in range(2)]

    migration, stop = with_qmp(server.path, body)
    assert migration["event"] == "MIGRATION"
    assert migration["data"] == {"status": "active"}
    assert set(migration["timestamp"]) == {"seconds", "microseconds"}
    assert 0 <= migration["timestamp"]["microseconds"] < 1_000_000
    assert stop["event"] == "STOP"
    assert "data" not in stop


def test_no_events_before_negotiation(server: QmpServer) -> None:
    raw = RawConnection(server.path)
    try:
        raw.ask(b'{"execute": "query-version"}\n')  # connected and served
        server.emit("STOP", {})
        raw.negotiate()  # the next line is the reply, not the event
        server.emit("RESUME", {})
        assert raw.read()["event"] == "RESUME"
    finally:
        raw.close()


# --- the socket ------------------------------------------------------------------------


def test_socket_is_0600_whatever_the_umask(sock_path: str, vm: FakeVm) -> None:
    old = os.umask(0)
    try:
        with QmpServer(sock_path, vm):
            st = os.stat(sock_path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        os.umask(old)


def test_two_clients_at_once(server: QmpServer, vm: FakeVm) -> None:
    async def both() -> tuple[Any, Any]:
        one, two = QMPClient("one"), QMPClient("two")
        await one.connect(server.path)
        await two.connect(server.path)
        try:
            await one.execute("stop")
            status = await two.execute("query-status")
            server.emit("STOP", {})
            events = await asyncio.gather(
                asyncio.wait_for(one.events.get(), 5), asyncio.wait_for(two.events.get(), 5)
            )
            return status, events
        finally:
            await one.disconnect()
            await two.disconnect()

    status, events = asyncio.run(asyncio.wait_for(both(), 10))
    assert status["running"] is False
    assert [e["event"] for e in events] == ["STOP", "STOP"]
