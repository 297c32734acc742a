"""Migration parameters: QEMU's defaults and names, validation that names what is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from vmferry.errors import ConfigError
from vmferry.migration.params import (
    MigrationCapabilities,
    MigrationParameters,
    channels,
    check_verify_options,
    verify_mode,
)


def test_defaults_are_qemus_except_bandwidth() -> None:
    p = MigrationParameters()
    assert p.to_qmp() == {
        "downtime-limit": 300,
        "max-bandwidth": 0,  # QEMU: 128 MiB/s; vmferry: unlimited on purpose
        "multifd-channels": 2,
        "multifd-compression": "none",
        "cpu-throttle-initial": 20,
        "cpu-throttle-increment": 10,
        "max-cpu-throttle": 99,
        "tls-creds": "",  # as QEMU shows unset TLS parameters
        "tls-hostname": "",
        "tls-authz": "",
        "x-switchover-timeout": 0,
        "x-switchover-policy": "keep-going",
        "x-peer-timeout": 5000,  # vmferry's own: a silent peer is dead after 5 s
        "x-verify": "on",  # vmferry's own: pre-resume check and an audit after resume
        "x-postcopy-after": "",  # vmferry's own: post-copy only when told
    }
    assert MigrationCapabilities().to_qmp() == {
        "auto-converge": False,
        "multifd": False,
        "x-verify": True,
        "x-verify-hold-output": False,
        "postcopy-ram": False,  # QEMU's default
        "postcopy-blocktime": False,
    }


def test_qmp_round_trip() -> None:
    p = MigrationParameters(
        downtime_limit_ms=50,
        max_bandwidth=1 << 30,
        multifd_channels=8,
        multifd_compression="zstd",
        cpu_throttle_initial=30,
        cpu_throttle_increment=5,
        max_cpu_throttle=90,
        tls_creds="/etc/vmferry/tls",
        tls_hostname="db.example",
        tls_authz="src-a,src-b",
        switchover_timeout_ms=10_000,
        switchover_policy="cancel",
        peer_timeout_ms=2000,
        verify="strict",
    )
    assert MigrationParameters().updated(p.to_qmp()) == p
    c = MigrationCapabilities(
        auto_converge=True, multifd=True, x_verify=False, x_verify_hold_output=True
    )
    assert MigrationCapabilities().updated(c.to_qmp()) == c
    assert c.to_qmp_list()[0] == {"capability": "auto-converge", "state": True}


def test_updated_keeps_the_rest_and_returns_a_new_instance() -> None:
    p = MigrationParameters()
    q = p.updated({"downtime-limit": 100})
    assert q.downtime_limit_ms == 100 and p.downtime_limit_ms == 300
    assert q.multifd_channels == p.multifd_channels


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("downtime-limit", -1, "0..2000000"),
        ("downtime-limit", 2_000_001, "0..2000000"),
        ("max-bandwidth", -5, "0.."),
        ("multifd-channels", 0, "1..255"),
        ("multifd-channels", 256, "1..255"),
        ("cpu-throttle-initial", 0, "1..99"),
        ("cpu-throttle-increment", 100, "1..99"),
        ("max-cpu-throttle", 100, "1..99"),
        ("x-switchover-timeout", -1, "0..86400000"),
        ("x-peer-timeout", 0, "100..600000"),  # every wait on the peer has a bound
        ("x-peer-timeout", 600_001, "100..600000"),
        ("multifd-compression", "zlib", "none, zstd"),
        ("x-switchover-policy", "pray", "keep-going, force, cancel"),
        ("downtime-limit", "300", "0..2000000"),
        ("multifd-channels", True, "1..255"),
        ("downtime-limit", 1.5, "0..2000000"),
    ],
)
def test_bad_values_name_parameter_value_and_range(name: str, value: Any, allowed: str) -> None:
    with pytest.raises(ConfigError) as e:
        MigrationParameters().updated({name: value})
    msg = str(e.value)
    assert name in msg and repr(value).strip("'") in msg and allowed in msg


def test_unknown_parameter_is_named() -> None:
    with pytest.raises(ConfigError, match="xbzrle-cache-size"):
        MigrationParameters().updated({"xbzrle-cache-size": 1 << 26})
    with pytest.raises(ConfigError, match="zero-copy-send"):
        MigrationCapabilities().updated({"zero-copy-send": True})


def test_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match="downtime-limit"):
        MigrationParameters(downtime_limit_ms=-3)
    with pytest.raises(ConfigError, match="multifd"):
        MigrationCapabilities(multifd=1)  # type: ignore[arg-type]


def test_channels_used() -> None:
    p = MigrationParameters(multifd_channels=4)
    assert channels(p, MigrationCapabilities()) == 1
    assert channels(p, MigrationCapabilities(multifd=True)) == 4


def test_verify_mode_is_the_parameter_unless_the_capability_turned_it_off() -> None:
    assert verify_mode(MigrationParameters(), MigrationCapabilities()) == "on"
    strict = MigrationParameters(verify="strict")
    assert verify_mode(strict, MigrationCapabilities()) == "strict"
    assert verify_mode(strict, MigrationCapabilities(x_verify=False)) == "off"
    with pytest.raises(ConfigError, match="x-verify = 'loose': allowed values are on, strict, off"):
        MigrationParameters(verify="loose")


@pytest.mark.parametrize(
    ("verify", "x_verify", "hold", "refused"),
    [
        ("on", True, True, None),
        ("strict", True, True, "x-verify = strict"),
        ("off", True, True, "x-verify = off"),
        ("on", False, True, "x-verify = off"),  # the older capability turned it off
        ("strict", True, False, None),
        ("off", False, False, None),
    ],
)
def test_hold_output_needs_the_audit_of_x_verify_on(
    verify: str, x_verify: bool, hold: bool, refused: str | None
) -> None:
    params = MigrationParameters(verify=verify)
    caps = MigrationCapabilities(x_verify=x_verify, x_verify_hold_output=hold)
    if refused is None:
        check_verify_options(params, caps)
        return
    with pytest.raises(ConfigError) as e:
        check_verify_options(params, caps)
    msg = str(e.value)
    assert "x-verify-hold-output" in msg and refused in msg and "\n" not in msg
