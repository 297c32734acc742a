"""The QMP commands vmferry answers, as data: arguments, backend method, reply shape.

Adding a command (a device or mdev one, say) is one `Command` in `_COMMANDS`, plus the
backend method it names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmferry.migration.params import (
    COMPRESSIONS,
    MAX_BANDWIDTH,
    MAX_DOWNTIME_LIMIT_MS,
    MAX_MULTIFD_CHANNELS,
    MAX_PEER_TIMEOUT_MS,
    MAX_SWITCHOVER_TIMEOUT_MS,
    MIN_PEER_TIMEOUT_MS,
    SWITCHOVER_POLICIES,
    VERIFY_MODES,
)
from vmferry.qmp.argtypes import Arg, Array, Bool, Int, Str, Struct
from vmferry.qmp.backend import QmpError

Json = Any  # a decoded JSON value; the checks in argtypes narrow it

#: Capabilities `migrate-set-capabilities` knows, in the order query lists them.
MIGRATION_CAPABILITIES: tuple[str, ...] = (
    "auto-converge",
    "multifd",
    "x-verify",
    "x-verify-hold-output",
    # QEMU's: post-copy may be started (set on both sides); vCPU wait times are kept.
    "postcopy-ram",
    "postcopy-blocktime",
)

_PERCENT = Int(1, 99, "percent")

#: `migrate-set-parameters`, all optional; `query-migrate-parameters` returns the same names.
#: The bounds are the migration engine's, so a value refused there is refused here first,
#: with QMP's wording.
MIGRATION_PARAMETERS: Mapping[str, Arg] = {
    "downtime-limit": Arg(Int(0, MAX_DOWNTIME_LIMIT_MS, "milliseconds")),
    # 0 means unlimited in vmferry (QEMU has no such value).
    "max-bandwidth": Arg(Int(0, MAX_BANDWIDTH, "bytes per second")),
    "multifd-channels": Arg(Int(1, MAX_MULTIFD_CHANNELS, "channels")),
    "multifd-compression": Arg(Str(COMPRESSIONS)),
    "cpu-throttle-initial": Arg(_PERCENT),
    "cpu-throttle-increment": Arg(_PERCENT),
    "max-cpu-throttle": Arg(_PERCENT),
    # x509 credentials directory, the host name its certificate must hold, the client CNs
    # a destination admits (comma-separated); "" clears each (docs/tls.md).
    "tls-creds": Arg(Str()),
    "tls-hostname": Arg(Str()),
    "tls-authz": Arg(Str()),
    # vmferry's own: how long switchover may take (0: no limit) and what to do past it.
    "x-switchover-timeout": Arg(Int(0, MAX_SWITCHOVER_TIMEOUT_MS, "milliseconds")),
    "x-switchover-policy": Arg(Str(SWITCHOVER_POLICIES)),
    # vmferry's own: how long a silent peer is waited for before the migration fails.
    "x-peer-timeout": Arg(Int(MIN_PEER_TIMEOUT_MS, MAX_PEER_TIMEOUT_MS, "milliseconds")),
    # vmferry's own: on (pre-resume check + audit after resume), strict (all before), off.
    "x-verify": Arg(Str(VERIFY_MODES)),
    # vmferry's own: switch to post-copy by itself after N rounds, a time, or both
    # ("5", "30s", "5,30s"; "" = only on migrate-start-postcopy). Checked by the backend.
    "x-postcopy-after": Arg(Str()),
}


def python_kwargs(args: dict[str, Json]) -> dict[str, Json]:
    """QMP's dashed argument names as Python keyword names."""
    return {key.replace("-", "_"): value for key, value in args.items()}


def plain_return(result: Json) -> Json:
    # QMP answers a command that returns nothing with an empty object.
    return {} if result is None else result


@dataclass(frozen=True)
class Command:
    """One QMP command.

    `method` names the `QmpBackend` method that runs it, or is None for the commands the
    protocol answers itself. `to_call` turns checked arguments into that method's keyword
    arguments; `to_return` turns its result into the reply's "return" value.
    """

    name: str
    args: Mapping[str, Arg] = field(default_factory=dict)
    method: str | None = None
    to_call: Callable[[dict[str, Json]], dict[str, Json]] = python_kwargs
    to_return: Callable[[Json], Json] = plain_return

    def check_arguments(self, arguments: Mapping[str, Json]) -> dict[str, Json]:
        """Checked arguments, or `QmpError` with QEMU's text for the first problem."""
        return Struct(self.args).check_members(arguments)


def _backend(name: str, **kwargs: Any) -> Command:
    """A command run by the backend method of the same name, underscored."""
    return Command(name, method=name.replace("-", "_"), **kwargs)


def _status_return(result: Json) -> Json:
    # QEMU 8 still reports singlestep; clients that read it expect it present.
    return {"singlestep": False, **result}


def _capabilities_call(args: dict[str, Json]) -> dict[str, Json]:
    return {"caps": {c["capability"]: c["state"] for c in args["capabilities"]}}


def _capabilities_return(result: Json) -> Json:
    return [{"capability": name, "state": state} for name, state in result.items()]


_CAPABILITY_STATE = Struct(
    {
        "capability": Arg(
            Str(MIGRATION_CAPABILITIES, rejected="Invalid parameter '{value}'"), required=True
        ),
        "state": Arg(Bool(), required=True),
    }
)

_COMMANDS: tuple[Command, ...] = (
    Command("qmp_capabilities", {"enable": Arg(Array(Str(("oob",))))}),
    Command("query-commands"),
    Command("query-version"),
    _backend("query-status", to_return=_status_return),
    _backend("stop"),
    _backend("cont"),
    _backend("quit"),
    _backend(
        "migrate",
        args={
            "uri": Arg(Str(), required=True),
            "detach": Arg(Bool()),
            "resume": Arg(Bool()),
        },
    ),
    _backend("migrate-incoming", args={"uri": Arg(Str(), required=True)}),
    _backend("migrate_cancel"),
    # Post-copy, as QEMU's: switch a running migration over (source), cut the link of one
    # in post-copy (either side), listen again on a new URI (destination; then `migrate`
    # with resume on the source).
    _backend("migrate-start-postcopy"),
    _backend("migrate-pause"),
    _backend("migrate-recover", args={"uri": Arg(Str(), required=True)}),
    _backend("query-migrate"),
    _backend(
        "migrate-set-parameters",
        args=MIGRATION_PARAMETERS,
        to_call=lambda args: {"params": args},
    ),
    _backend("query-migrate-parameters"),
    _backend(
        "migrate-set-capabilities",
        args={"capabilities": Arg(Array(_CAPABILITY_STATE), required=True)},
        to_call=_capabilities_call,
    ),
    _backend("query-migrate-capabilities", to_return=_capabilities_return),
    # vmferry's own: the whole report of the last migration (rounds, downtime breakdown,
    # verification), as `--report` writes it.
    _backend("x-query-migrate-report"),
    # QEMU's human monitor, for `qmp-shell -H`: `info status` and `info migrate`.
    _backend(
        "human-monitor-command",
        args={
            "command-line": Arg(Str(), required=True),
            "cpu-index": Arg(Int(0, None, "vCPU index")),
        },
    ),
    # vmferry's own: the host's vGPUs (mediated devices), as `vmferry mdev` manages them.
    _backend("x-mdev-types", args={"parent": Arg(Str())}),
    _backend(
        "x-mdev-create",
        args={
            "type": Arg(Str(("vgpu-1", "vgpu-2", "vgpu-4", "vgpu-8")), required=True),
            "uuid": Arg(Str()),
            "parent": Arg(Str()),
            "vram": Arg(Int(1, None, "bytes")),
        },
    ),
    _backend("x-mdev-remove", args={"uuid": Arg(Str(), required=True)}),
    _backend("x-mdev-list"),
    # vmferry's own: the host's SR-IOV NICs, as `vmferry sriov` manages them.
    _backend(
        "x-sriov-set-numvfs",
        args={"pf": Arg(Str(), required=True), "numvfs": Arg(Int(0, 16, "VFs"), required=True)},
    ),
    _backend(
        "x-sriov-config-vf",
        args={
            "pf": Arg(Str(), required=True),
            "index": Arg(Int(0, 15, "VF index"), required=True),
            "mac": Arg(Str()),
            "vlan": Arg(Int(0, 4094, "VLAN id")),
            "queues": Arg(Int(1, 4, "queues")),
        },
    ),
    _backend("x-query-sriov"),
)

COMMANDS: Mapping[str, Command] = {c.name: c for c in _COMMANDS}


def find_command(name: str) -> Command:
    try:
        return COMMANDS[name]
    except KeyError:
        raise QmpError(f"The command {name} has not been found", "CommandNotFound") from None
