"""Error replies: bad arguments, unknown commands, failing backends, malformed input."""

from __future__ import annotations

from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.qmp.fakes import FakeVm
from tests.qmp.wire import RawConnection, error_of, status, with_qmp
from vmferry.qmp import QmpServer

# --- errors ----------------------------------------------------------------------------

_CAP = "capabilities"
BAD_ARGUMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("migrate", {}, "Parameter 'uri' is missing"),
    ("migrate", {"uri": 5}, "Invalid parameter type for 'uri', expected: string"),
    (
        "migrate",
        {"uri": "x", "detach": "yes"},
        "Invalid parameter type for 'detach', expected: boolean",
    ),
    ("migrate", {"uri": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("migrate-incoming", {}, "Parameter 'uri' is missing"),
    ("stop", {"force": True}, "Parameter 'force' is unexpected"),
    (
        "migrate-set-parameters",
        {"downtime-limit": "300"},
        "Invalid parameter type for 'downtime-limit', expected: integer",
    ),
    (
        "migrate-set-parameters",
        {"downtime-limit": 1.5},
        "Invalid parameter type for 'downtime-limit', expected: integer",
    ),
    (
        "migrate-set-parameters",
        {"x-switchover-timeout": True},
        "Invalid parameter type for 'x-switchover-timeout', expected: integer",
    ),
    (
        "migrate-set-parameters",
        {"downtime-limit": 2_000_001},
        "Parameter 'downtime-limit' must be an integer from 0 to 2000000 (milliseconds)",
    ),
    (
        "migrate-set-parameters",
        {"downtime-limit": -1},
        "Parameter 'downtime-limit' must be an integer from 0 to 2000000 (milliseconds)",
    ),
    (
        "migrate-set-parameters",
        {"max-bandwidth": -1},
        "Parameter 'max-bandwidth' must be an integer from 0 to 9223372036854775807"
        " (bytes per second)",
    ),
    (
        "migrate-set-parameters",
        {"multifd-channels": 0},
        "Parameter 'multifd-channels' must be an integer from 1 to 255 (channels)",
    ),
    (
        "migrate-set-parameters",
        {"multifd-channels": 256},
        "Parameter 'multifd-channels' must be an integer from 1 to 255 (channels)",
    ),
    (
        "migrate-set-parameters",
        {"cpu-throttle-initial": 100},
        "Parameter 'cpu-throttle-initial' must be an integer from 1 to 99 (percent)",
    ),
    (
        "migrate-set-parameters",
        {"x-switchover-timeout": 86_400_001},
        "Parameter 'x-switchover-timeout' must be an integer from 0 to 86400000 (milliseconds)",
    ),
    (
        "migrate-set-parameters",
        {"multifd-compression": "lz4"},
        "Parameter 'multifd-compression' does not accept value 'lz4'",
    ),
    (
        "migrate-set-parameters",
        {"x-switchover-policy": "maybe"},
        "Parameter 'x-switchover-policy' does not accept value 'maybe'",
    ),
    ("migrate-set-parameters", {"speed": 1}, "Parameter 'speed' is unexpected"),
    ("migrate-set-capabilities", {}, "Parameter 'capabilities' is missing"),
    (
        "migrate-set-capabilities",
        {_CAP: {"capability": "multifd", "state": True}},
        "Invalid parameter type for 'capabilities', expected: array",
    ),
    (
        "migrate-set-capabilities",
        {_CAP: [{"capability": "zero-copy-send", "state": True}]},
        "Invalid parameter 'zero-copy-send'",
    ),
    (
        "migrate-set-capabilities",
        {_CAP: [{"capability": "multifd"}]},
        "Parameter 'capabilities[0].state' is missing",
    ),
    (
        "migrate-set-capabilities",
        {_CAP: [{"capability": "multifd", "state": True}, "x-verify"]},
        "Invalid parameter type for 'capabilities[1]', expected: object",
    ),
    (
        "migrate-set-capabilities",
        {_CAP: [{"capability": "multifd", "state": 1}]},
        "Invalid parameter type for 'capabilities[0].state', expected: boolean",
    ),
    (
        "qmp_capabilities",
        {"enable": "oob"},
        "Invalid parameter type for 'enable', expected: array",
    ),
]


@pytest.mark.parametrize(("command", "args", "desc"), BAD_ARGUMENTS)
def test_bad_arguments_refused_before_the_backend(
    server: QmpServer, vm: FakeVm, command: str, args: dict[str, Any], desc: str
) -> None:
    async def body(qmp: QMPClient) -> tuple[str, str]:
        return await error_of(qmp, command, args)

    assert with_qmp(server.path, body) == ("GenericError", desc)
    assert vm.calls == []


def test_unknown_command(server: QmpServer) -> None:
    async def body(qmp: QMPClient) -> tuple[str, str]:
        return await error_of(qmp, "query-block")

    assert with_qmp(server.path, body) == (
        "CommandNotFound",
        "The command query-block has not been found",
    )


def test_backend_errors_reach_the_client_and_the_session_survives(server: QmpServer) -> None:
    async def body(qmp: QMPClient) -> None:
        assert await error_of(qmp, "migrate", {"uri": "refused:"}) == (
            "DeviceNotActive",
            "migration refused by the fake",
        )
        assert await error_of(qmp, "migrate-incoming", {"uri": "crash:"}) == (
            "GenericError",
            "the fake backend broke",
        )
        assert (await status(qmp))["running"] is True

    with_qmp(server.path, body)


def test_unencodable_backend_result_is_an_error_not_a_crash(sock_path: str) -> None:
    class OddVm(FakeVm):
        def query_migrate(self) -> dict[str, Any]:
            return {"status": object()}

    with QmpServer(sock_path, OddVm()) as srv:
        raw = RawConnection(srv.path)
        raw.negotiate()
        reply = raw.ask(b'{"execute": "query-migrate", "id": 7}\n')
        assert reply["id"] == 7
        assert reply["error"]["class"] == "GenericError"
        assert raw.ask(b'{"execute": "stop"}\n') == {"return": {}}
        raw.close()


# --- the wire, below what qemu.qmp lets one send ----------------------------------------


def _generic(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


def test_malformed_requests(server: QmpServer) -> None:
    raw = RawConnection(server.path)
    try:
        raw.negotiate()
        bad = raw.ask(b'{"execute": "stop",}\n')
        assert bad["error"]["class"] == "GenericError"
        assert bad["error"]["desc"].startswith("JSON parse error, ")
        assert "id" not in bad
        assert raw.ask(b"[1, 2]\n") == _generic("QMP input must be a JSON object")
        assert raw.ask(b"42\n") == _generic("QMP input must be a JSON object")
        assert raw.ask(b'{"arguments": {}, "id": 3}\n') == {
            **_generic("QMP input member 'execute' is missing"),
            "id": 3,
        }
        assert raw.ask(b'{"execute": 1}\n') == _generic(
            "QMP input member 'execute' must be a string"
        )
        assert raw.ask(b'{"execute": "stop", "arguments": []}\n') == _generic(
            "QMP input member 'arguments' must be an object"
        )
        assert raw.ask(b'{"execute": "stop", "control": {}}\n') == _generic(
            "QMP input member 'control' is unexpected"
        )
        # After all that, the session still works.
        assert raw.ask(b'{"execute": "cont"}\n') == {"return": {}}
    finally:
        raw.close()


def test_id_is_echoed_as_given_and_only_when_given(server: QmpServer) -> None:
    raw = RawConnection(server.path)
    try:
        raw.negotiate()
        assert raw.ask(b'{"execute": "stop", "id": {"n": [1, "x"]}}\n') == {
            "return": {},
            "id": {"n": [1, "x"]},
        }
        assert raw.ask(b'{"execute": "stop"}\n') == {"return": {}}
        assert raw.ask(b'{"execute": "nope", "id": null}\n') == {
            "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
            "id": None,
        }
    finally:
        raw.close()
