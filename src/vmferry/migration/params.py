"""Migration parameters and capabilities, under QEMU's QMP names.

Defaults are QEMU's (``migrate-set-parameters`` / ``migrate-set-capabilities``), except
``max-bandwidth``: QEMU limits a migration to 128 MiB/s unless told otherwise; vmferry
sends as fast as the link allows unless told otherwise. ``x-switchover-timeout`` and
``x-switchover-policy`` are vmferry's own (hence the ``x-``), as is ``x-peer-timeout``
(how long a silent peer is waited for), the ``x-verify`` parameter (on: a pre-resume
check of what the dirty log cannot vouch for and a full audit after resume; strict: all of
it before resume; off) and the ``x-verify`` (false: off) and ``x-verify-hold-output``
capabilities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from vmferry.errors import ConfigError
from vmferry.migration.postcopy_policy import parse_postcopy_after

COMPRESSIONS: Final = ("none", "zstd")  # QEMU also has zlib, qpl, uadk, qatzip
SWITCHOVER_POLICIES: Final = ("keep-going", "force", "cancel")
VERIFY_MODES: Final = ("on", "strict", "off")

# QEMU's limits: downtime-limit ≤ 2000 s, multifd-channels 1..255, throttle values 1..99.
MAX_DOWNTIME_LIMIT_MS: Final = 2_000_000
MAX_MULTIFD_CHANNELS: Final = 255
MAX_BANDWIDTH: Final = 2**63 - 1
# vmferry's own bound on x-switchover-timeout: one day; longer is a typo, not a plan.
MAX_SWITCHOVER_TIMEOUT_MS: Final = 86_400_000
# x-peer-timeout: below 100 ms a busy host's scheduling jitter would kill migrations;
# above 10 min a hung peer holds a paused VM far longer than anyone would wait.
MIN_PEER_TIMEOUT_MS: Final = 100
MAX_PEER_TIMEOUT_MS: Final = 600_000

# Python field name → QMP name, in QEMU's order.
_PARAM_NAMES: Final = {
    "downtime_limit_ms": "downtime-limit",
    "max_bandwidth": "max-bandwidth",
    "multifd_channels": "multifd-channels",
    "multifd_compression": "multifd-compression",
    "cpu_throttle_initial": "cpu-throttle-initial",
    "cpu_throttle_increment": "cpu-throttle-increment",
    "max_cpu_throttle": "max-cpu-throttle",
    "tls_creds": "tls-creds",
    "tls_hostname": "tls-hostname",
    "tls_authz": "tls-authz",
    "switchover_timeout_ms": "x-switchover-timeout",
    "switchover_policy": "x-switchover-policy",
    "peer_timeout_ms": "x-peer-timeout",
    "verify": "x-verify",
    "postcopy_after": "x-postcopy-after",
}
_INT_RANGES: Final = {
    "downtime_limit_ms": (0, MAX_DOWNTIME_LIMIT_MS, "ms"),
    "max_bandwidth": (0, MAX_BANDWIDTH, "bytes/s, 0 = unlimited"),
    "multifd_channels": (1, MAX_MULTIFD_CHANNELS, "channels"),
    "cpu_throttle_initial": (1, 99, "%"),
    "cpu_throttle_increment": (1, 99, "%"),
    "max_cpu_throttle": (1, 99, "%"),
    "switchover_timeout_ms": (0, MAX_SWITCHOVER_TIMEOUT_MS, "ms, 0 = none"),
    "peer_timeout_ms": (MIN_PEER_TIMEOUT_MS, MAX_PEER_TIMEOUT_MS, "ms"),
}
_CHOICES: Final = {
    "multifd_compression": COMPRESSIONS,
    "switchover_policy": SWITCHOVER_POLICIES,
    "verify": VERIFY_MODES,
}
# Strings, "" when unset (as QEMU shows them): see vmferry.migration.tls.
_STRINGS: Final = ("tls_creds", "tls_hostname", "tls_authz", "postcopy_after")
_CAP_NAMES: Final = {
    "auto_converge": "auto-converge",
    "multifd": "multifd",
    "x_verify": "x-verify",
    "x_verify_hold_output": "x-verify-hold-output",
    "postcopy_ram": "postcopy-ram",
    "postcopy_blocktime": "postcopy-blocktime",
}


def _check_int(qmp_name: str, value: object, low: int, high: int, unit: str) -> None:
    # bool is an int in Python, but `true` for a byte count is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{qmp_name} = {value!r}: expected an integer in {low}..{high} ({unit})")
    if not low <= value <= high:
        raise ConfigError(f"{qmp_name} = {value} is out of range: allowed {low}..{high} ({unit})")


def _check_choice(qmp_name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{qmp_name} = {value!r}: allowed values are {', '.join(choices)}")


def _renamed(qmp: Mapping[str, Any], names: Mapping[str, str], what: str) -> dict[str, Any]:
    """QMP-named keys → field names; an unknown key is an error naming it."""
    by_qmp = {q: f for f, q in names.items()}
    unknown = sorted(k for k in qmp if k not in by_qmp)
    if unknown:
        raise ConfigError(
            f"unknown migration {what} {', '.join(unknown)}: known are {', '.join(names.values())}"
        )
    return {by_qmp[k]: v for k, v in qmp.items()}


@dataclass(frozen=True)
class MigrationParameters:
    """What ``migrate-set-parameters`` sets; validated on construction."""

    downtime_limit_ms: int = 300  # QEMU's default
    max_bandwidth: int = 0  # bytes/s; 0 = unlimited (QEMU: 128 MiB/s)
    multifd_channels: int = 2  # QEMU's default; used only with the multifd capability
    multifd_compression: str = "none"
    cpu_throttle_initial: int = 20  # QEMU's default, in %
    cpu_throttle_increment: int = 10  # QEMU's default, in %
    max_cpu_throttle: int = 99  # QEMU's default, in %
    tls_creds: str = ""  # a directory of x509 credentials (QEMU's file names); "" = no TLS
    tls_hostname: str = ""  # the name the destination's certificate must hold; "" = URI's host
    tls_authz: str = ""  # destination: client certificate CNs admitted, comma-separated
    switchover_timeout_ms: int = 0  # 0 = wait for convergence forever (QEMU's behaviour)
    switchover_policy: str = "keep-going"  # what to do when the timeout passes
    # A peer silent this long is dead: the source rolls back, the destination gives up.
    peer_timeout_ms: int = 5000
    # on: the dirty log's blind spots before resume, a full audit after; strict: all of
    # it before resume (in the downtime); off: nothing.
    verify: str = "on"
    # With postcopy-ram: switch to post-copy by itself when pre-copy has not converged
    # after N rounds ("5"), a time ("30s", "500ms"), or whichever comes first ("5,30s");
    # "" = only when migrate-start-postcopy says so. Parsed by postcopy_policy.
    postcopy_after: str = ""

    def __post_init__(self) -> None:
        for name, (low, high, unit) in _INT_RANGES.items():
            _check_int(_PARAM_NAMES[name], getattr(self, name), low, high, unit)
        for name, choices in _CHOICES.items():
            _check_choice(_PARAM_NAMES[name], getattr(self, name), choices)
        for name in _STRINGS:
            if not isinstance(getattr(self, name), str):
                value = getattr(self, name)
                raise ConfigError(f"{_PARAM_NAMES[name]} = {value!r}: expected a string")
        parse_postcopy_after(self.postcopy_after)  # refused here, not at a round's end

    def to_qmp(self) -> dict[str, Any]:
        return {q: getattr(self, f) for f, q in _PARAM_NAMES.items()}

    @property
    def peer_timeout_s(self) -> float:
        return self.peer_timeout_ms / 1e3

    def updated(self, qmp: Mapping[str, Any]) -> MigrationParameters:
        """A copy with the given QMP-named parameters changed; the others are kept."""
        return replace(self, **_renamed(qmp, _PARAM_NAMES, "parameter"))


@dataclass(frozen=True)
class MigrationCapabilities:
    """What ``migrate-set-capabilities`` sets."""

    auto_converge: bool = False  # QEMU's default
    multifd: bool = False  # QEMU's default
    x_verify: bool = True  # vmferry's: false turns verification off (x-verify param: how)
    # The host switch holds the destination VF's frames until the audit passed.
    x_verify_hold_output: bool = False
    # QEMU's: post-copy may be started (set on both sides); blocktime figures are kept.
    postcopy_ram: bool = False
    postcopy_blocktime: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise ConfigError(f"{_CAP_NAMES[f.name]} = {value!r}: expected true or false")

    def to_qmp(self) -> dict[str, bool]:
        return {q: bool(getattr(self, f)) for f, q in _CAP_NAMES.items()}

    def to_qmp_list(self) -> list[dict[str, Any]]:
        """The shape of QEMU's ``query-migrate-capabilities`` reply."""
        return [{"capability": q, "state": s} for q, s in self.to_qmp().items()]

    def updated(self, qmp: Mapping[str, Any]) -> MigrationCapabilities:
        """A copy with the given QMP-named capabilities changed; the others are kept."""
        return replace(self, **_renamed(qmp, _CAP_NAMES, "capability"))


def verify_mode(params: MigrationParameters, caps: MigrationCapabilities) -> str:
    """How a migration verifies: the x-verify parameter, unless the (older) x-verify
    capability turned verification off."""
    return params.verify if caps.x_verify else "off"


def check_verify_options(params: MigrationParameters, caps: MigrationCapabilities) -> None:
    """Refuse x-verify-hold-output where nothing would release what it holds: the frames
    are held during the post-resume audit, which only x-verify on runs."""
    mode = verify_mode(params, caps)
    if caps.x_verify_hold_output and mode != "on":
        raise ConfigError(
            f"x-verify-hold-output needs x-verify on, but x-verify = {mode}: only on audits "
            f"after resume (the time output is held); set x-verify on or the capability off"
        )


def channels(params: MigrationParameters, caps: MigrationCapabilities) -> int:
    """How many channels a migration really opens: multifd-channels only with multifd."""
    return params.multifd_channels if caps.multifd else 1
