"""What the host can back: /proc/meminfo read, and sizes refused or allowed."""

from __future__ import annotations

import pytest

from vmferry.errors import ConfigError
from vmferry.memory.host_memory import HostMemory, check_guest_ram, check_prealloc

MEMINFO = """MemTotal:        8388608 kB
MemFree:          100000 kB
MemAvailable:    4194304 kB
SwapTotal:       2097152 kB
SwapFree:        1048576 kB
HugePages_Total:       0
"""
GIB = 1 << 30


def test_meminfo_is_read_in_bytes() -> None:
    h = HostMemory.parse(MEMINFO)
    assert (h.ram, h.swap, h.available, h.total) == (8 * GIB, 2 * GIB, 5 * GIB, 10 * GIB)
    with pytest.raises(ConfigError, match="no MemAvailable"):
        HostMemory.parse("MemTotal: 1 kB\n")


def test_guest_ram_beyond_ram_and_swap_needs_overcommit() -> None:
    h = HostMemory.parse(MEMINFO)
    check_guest_ram(10 * GIB, h, overcommit=False)  # sparse: more than is free now is fine
    with pytest.raises(ConfigError, match="can never back the whole guest"):
        check_guest_ram(10 * GIB + (2 << 20), h, overcommit=False)
    check_guest_ram(1 << 40, h, overcommit=True)


def test_prealloc_must_fit_in_what_is_available_now() -> None:
    h = HostMemory.parse(MEMINFO)
    check_prealloc(5 * GIB, h)
    with pytest.raises(ConfigError, match=r"only 5\.0 GiB can be allocated"):
        check_prealloc(5 * GIB + 4096, h)


def test_this_host_reads() -> None:
    h = HostMemory.read()
    assert h.available > 0 and h.ram <= h.total
