from __future__ import annotations

import os

import numpy as np
import pytest

from vmferry.errors import ConfigError, VmferryError
from vmferry.memory import DirtyBitmap, GuestMemory
from vmferry.memory.guest_memory import HIGH_RAM_BASE, LOW_RAM_LIMIT


def test_ram_above_3g_is_placed_from_4g() -> None:
    m = GuestMemory(5 << 30)
    try:
        assert [(r.gpa, r.ram_offset, r.size) for r in m.regions] == [
            (0, 0, LOW_RAM_LIMIT),
            (HIGH_RAM_BASE, LOW_RAM_LIMIT, 2 << 30),
        ]
        assert m.gpa_to_offset(HIGH_RAM_BASE + 8) == LOW_RAM_LIMIT + 8
        with pytest.raises(VmferryError, match="not inside guest RAM"):
            m.gpa_to_offset(LOW_RAM_LIMIT + 4096)  # the MMIO hole
    finally:
        m.close()


def test_16g_guest_is_sparse_until_touched() -> None:
    m = GuestMemory(16 << 30)
    try:
        assert m.data_ranges() == []
        m.write_gpa(HIGH_RAM_BASE + (5 << 30), b"\x01")
        assert len(m.resident_pages()) == 1
        assert os.fstat(m.fd).st_blocks * 512 <= 1 << 20
    finally:
        m.close()


def test_another_mapping_of_the_fd_sees_the_same_bytes() -> None:
    m = GuestMemory(64 << 20)
    try:
        m.write_gpa(0x123000, b"shared")
        other = GuestMemory.from_fd(os.dup(m.fd), m.size)
        assert other.read_gpa(0x123000, 6) == b"shared"
        other.close()
    finally:
        m.close()


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of 2 MiB"):
        GuestMemory(3 << 20 | 1)


def test_data_ranges_of_full_empty_and_partial_ram_agree_with_the_walk() -> None:
    m = GuestMemory(8 << 20)
    try:
        assert m.data_ranges() == [] and m.resident_pages().size == 0
        assert m.resident_bitmap().count() == 0
        m.write_gpa(0x5000, b"\x01")
        m.write_gpa(0x7FF000, b"\x02")  # the last page
        assert m.data_ranges() == [(0x5000, 0x6000), (0x7FF000, 0x800000)]
        m.populate()
        assert m.data_ranges() == [(0, 8 << 20)]
        assert m.resident_pages().tolist() == list(range(2048))
        assert m.resident_bitmap().count() == 2048
    finally:
        m.close()


def test_data_ranges_from_page_residency_match_the_tmpfs_walk() -> None:
    m = GuestMemory(16 << 20)
    try:
        rng = np.random.default_rng(7)
        for p in rng.choice(4096, size=300, replace=False).tolist():
            m.write_gpa(p * 4096 + 8, b"x")
        m.write_gpa(4095 * 4096, b"y")  # the last page
        other = GuestMemory.from_fd(os.dup(m.fd), m.size)  # written through another mapping
        other.write_gpa(5 << 20, b"z" * 8192)
        other.close()
        walked = m._walk_data_ranges()
        assert m.data_ranges() == walked
        expect = np.concatenate([np.arange(s >> 12, e >> 12) for s, e in walked])
        assert np.array_equal(m.resident_pages(), expect)
        assert np.array_equal(m.resident_bitmap().words, DirtyBitmap.from_pages(4096, expect).words)
    finally:
        m.close()
