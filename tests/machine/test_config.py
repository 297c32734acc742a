"""Sizes as users write them (QEMU's -m conventions) and the guests' command-line keys."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT
from vmferry.errors import ConfigError
from vmferry.machine.config import parse_size
from vmferry.machine.images import GUEST_KEYS, RUNTIME_KEYS, check_guest_args

MIB = 1 << 20


@pytest.mark.parametrize(
    "text,unit,size",
    [
        ("100", "M", 100 * MIB),
        ("100", "B", 100),
        ("1.5G", "M", 1536 * MIB),
        ("0.5M", "B", 512 << 10),
        ("2GiB", "M", 2 << 30),
        ("64MB", "M", 64 * MIB),
        ("4096B", "M", 4096),
        ("1t", "M", 1 << 40),
    ],
)
def test_sizes(text: str, unit: str, size: int) -> None:
    assert parse_size(text, default_unit=unit) == size


@pytest.mark.parametrize("text", ["", "-1", "1.5", "1.2.3G", "1X", "G"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def _keys_in_source(name: str) -> frozenset[str]:
    src = (ROOT / "guests" / f"{name}.c").read_text()
    return frozenset(re.findall(r'cmd_get_(?:u64|str)\("([a-z_]+)"', src))


@pytest.mark.parametrize("name", [n for n, keys in GUEST_KEYS.items() if keys is not None])
def test_the_key_table_matches_what_each_guest_reads(name: str) -> None:
    assert GUEST_KEYS[name] == _keys_in_source(name)


def test_the_runtime_keys_match_the_runtime() -> None:
    src = (ROOT / "guests" / "rt" / "rt.c").read_text()
    assert set(re.findall(r'cmd_get_u64\("([a-z_]+)"', src)) == RUNTIME_KEYS


def test_every_built_in_guest_is_in_the_table() -> None:
    progs = re.search(r"^PROGS\s*:=(.*)$", (ROOT / "guests" / "Makefile").read_text(), re.M)
    assert progs is not None
    assert set(progs.group(1).split()) == set(GUEST_KEYS)


def test_guest_args_are_checked_for_built_ins_only() -> None:
    check_guest_args("memtouch", "wss=1M  rounds=2")
    with pytest.raises(ConfigError, match="memtouch has no key 'ws'"):
        check_guest_args("memtouch", "ws=1M")
    check_guest_args("hello", "anything at all")
    check_guest_args("./my.elf", "x=1 y")
    check_guest_args("custom-not-built-in", "x=1")
