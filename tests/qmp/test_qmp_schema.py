"""The schema on its own: argument checks and the command table, no sockets."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from tests.qmp.fakes import FakeVm
from vmferry.migration.params import MigrationParameters
from vmferry.qmp import QmpBackend, QmpError
from vmferry.qmp.argtypes import Arg, Array, Bool, Int, Number, Str, Struct
from vmferry.qmp.schema import COMMANDS, MIGRATION_PARAMETERS, find_command


def refusal(command: str, args: dict[str, Any]) -> str:
    with pytest.raises(QmpError) as info:
        COMMANDS[command].check_arguments(args)
    assert info.value.error_class == "GenericError"
    return info.value.desc


def test_fake_backend_satisfies_the_protocol() -> None:
    backend: QmpBackend = FakeVm()  # mypy checks the structure; this keeps the import used
    assert backend is not None


def test_every_backend_command_names_a_protocol_method() -> None:
    protocol_methods = {n for n, _ in inspect.getmembers(QmpBackend, inspect.isfunction)}
    named = {c.method for c in COMMANDS.values() if c.method is not None}
    assert named <= protocol_methods


def test_names_and_methods() -> None:
    assert COMMANDS["migrate_cancel"].method == "migrate_cancel"
    assert COMMANDS["migrate-set-parameters"].method == "migrate_set_parameters"
    assert COMMANDS["qmp_capabilities"].method is None
    with pytest.raises(QmpError) as info:
        find_command("nope")
    assert (info.value.error_class, info.value.desc) == (
        "CommandNotFound",
        "The command nope has not been found",
    )


def test_required_typed_and_unexpected() -> None:
    assert refusal("migrate", {}) == "Parameter 'uri' is missing"
    assert refusal("migrate", {"uri": None}) == "Invalid parameter type for 'uri', expected: string"
    assert refusal("migrate", {"uri": "u", "x": 1}) == "Parameter 'x' is unexpected"
    assert COMMANDS["migrate"].check_arguments({"uri": "u", "resume": True}) == {
        "uri": "u",
        "resume": True,
    }


def test_missing_is_reported_before_unexpected() -> None:
    assert refusal("migrate", {"x": 1}) == "Parameter 'uri' is missing"


@pytest.mark.parametrize("name", sorted(MIGRATION_PARAMETERS))
def test_every_parameter_refuses_a_wrong_type(name: str) -> None:
    desc = refusal("migrate-set-parameters", {name: [1]})
    assert desc.startswith(f"Invalid parameter type for '{name}', expected: ")


UNITS = {
    "downtime-limit": "milliseconds",
    "max-bandwidth": "bytes per second",
    "multifd-channels": "channels",
    "cpu-throttle-initial": "percent",
    "cpu-throttle-increment": "percent",
    "max-cpu-throttle": "percent",
    "x-switchover-timeout": "milliseconds",
}


def test_parameters_accepted_by_the_migration_engine() -> None:
    # Whatever the schema lets through, MigrationParameters takes without a ConfigError.
    for name, arg in MIGRATION_PARAMETERS.items():
        values: list[Any] = [arg.type.low, arg.type.high] if isinstance(arg.type, Int) else []
        if isinstance(arg.type, Str) and arg.type.values:
            values = list(arg.type.values)
        for value in values:
            MigrationParameters().updated({name: value})


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("downtime-limit", 0, 2_000_000),
        ("max-bandwidth", 0, 2**63 - 1),
        ("multifd-channels", 1, 255),
        ("cpu-throttle-initial", 1, 99),
        ("cpu-throttle-increment", 1, 99),
        ("max-cpu-throttle", 1, 99),
        ("x-switchover-timeout", 0, 86_400_000),
    ],
)
def test_integer_parameter_bounds(name: str, low: int, high: int) -> None:
    command = COMMANDS["migrate-set-parameters"]
    assert command.check_arguments({name: low}) == {name: low}
    assert command.check_arguments({name: high}) == {name: high}
    for outside in (low - 1, high + 1):
        assert refusal("migrate-set-parameters", {name: outside}) == (
            f"Parameter '{name}' must be an integer from {low} to {high} ({UNITS[name]})"
        )


def test_enumerations() -> None:
    command = COMMANDS["migrate-set-parameters"]
    for policy in ("keep-going", "force", "cancel"):
        assert command.check_arguments({"x-switchover-policy": policy})
    for compression in ("none", "zstd"):
        assert command.check_arguments({"multifd-compression": compression})
    assert refusal("migrate-set-parameters", {"multifd-compression": "zlib"}) == (
        "Parameter 'multifd-compression' does not accept value 'zlib'"
    )


def test_capabilities_to_backend_call() -> None:
    command = COMMANDS["migrate-set-capabilities"]
    args = command.check_arguments(
        {"capabilities": [{"capability": "auto-converge", "state": True}]}
    )
    assert command.to_call(args) == {"caps": {"auto-converge": True}}
    assert (
        refusal(
            "migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]}
        )
        == "Invalid parameter 'xbzrle'"
    )
    assert (
        refusal(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "multifd", "state": True, "extra": 1}]},
        )
        == "Parameter 'capabilities[0].extra' is unexpected"
    )


def test_replies_shaped_as_qemu() -> None:
    assert COMMANDS["stop"].to_return(None) == {}
    assert COMMANDS["query-status"].to_return({"running": True, "status": "running"}) == {
        "running": True,
        "status": "running",
        "singlestep": False,
    }
    assert COMMANDS["query-migrate-capabilities"].to_return({"multifd": True}) == [
        {"capability": "multifd", "state": True}
    ]
    assert COMMANDS["migrate"].to_call({"uri": "u", "detach": False}) == {
        "uri": "u",
        "detach": False,
    }


@pytest.mark.parametrize(
    ("arg_type", "good", "bad", "expected"),
    [
        (Str(), "s", 1, "string"),
        (Int(), -(2**63), True, "integer"),
        (Int(), 2**64 - 1, 2**64, "integer"),
        (Int(), 0, 0.0, "integer"),
        (Bool(), False, 0, "boolean"),
        (Number(), 1.5, "1.5", "number"),
        (Number(), 3, False, "number"),
        (Array(Int()), [1, 2], (1, 2), "array"),
        (Struct({"a": Arg(Int())}), {"a": 1}, [], "object"),
    ],
)
def test_argument_types(arg_type: Any, good: Any, bad: Any, expected: str) -> None:
    assert arg_type.check(good, "p") == good
    with pytest.raises(QmpError) as info:
        arg_type.check(bad, "p")
    assert info.value.desc == f"Invalid parameter type for 'p', expected: {expected}"


def test_nested_paths() -> None:
    nested = Array(Struct({"inner": Arg(Array(Int(0, 1)), required=True)}))
    with pytest.raises(QmpError) as info:
        nested.check([{"inner": [0]}, {"inner": [1, "x"]}], "outer")
    assert info.value.desc == "Invalid parameter type for 'outer[1].inner[1]', expected: integer"
    with pytest.raises(QmpError) as info:
        nested.check([{}], "outer")
    assert info.value.desc == "Parameter 'outer[0].inner' is missing"


def test_range_wording() -> None:
    assert Int(1, 2).describe_range() == "an integer from 1 to 2"
    assert Int(None, 5, "ms").describe_range() == "an integer of at most 5 (ms)"
    assert Int().describe_range() == "an integer"
