"""vmferry's own synchronous QMP client against a QmpServer."""

from __future__ import annotations

import threading

import pytest

from tests.qmp.fakes import FakeVm
from vmferry import __version__
from vmferry.qmp import QmpClient, QmpError, QmpServer

# --- vmferry's own client --------------------------------------------------------------


def test_vmferry_client(server: QmpServer, vm: FakeVm) -> None:
    with QmpClient(server.path) as client:
        assert client.greeting["QMP"]["version"]["package"] == f"vmferry {__version__}"
        client.execute("migrate-set-parameters", **{"downtime-limit": 500})
        assert client.execute("query-migrate-parameters")["downtime-limit"] == 500
        with pytest.raises(QmpError) as info:
            client.execute("migrate-set-parameters", **{"multifd-channels": 0})
        assert info.value.error_class == "GenericError"
        assert "multifd-channels" in info.value.desc
        with pytest.raises(QmpError) as info:
            client.execute("no-such")
        assert info.value.error_class == "CommandNotFound"


def test_vmferry_client_keeps_events_that_arrive_between_replies(server: QmpServer) -> None:
    with QmpClient(server.path) as client:
        client.execute("query-status")
        server.emit("STOP", {})
        server.emit("MIGRATION", {"status": "setup"})
        assert client.execute("query-status")["running"] is True
        assert [e["event"] for e in client.events] == ["STOP", "MIGRATION"]
        assert client.wait_event("MIGRATION", timeout=1)["data"] == {"status": "setup"}
        assert [e["event"] for e in client.events] == ["STOP"]
        threading.Timer(0.05, server.emit, ("RESUME", {})).start()
        assert client.wait_event("RESUME", timeout=5)["event"] == "RESUME"
        with pytest.raises(TimeoutError):
            client.wait_event("SHUTDOWN", timeout=0.1)
        assert client.execute("query-version")["qemu"]["major"] == 0
