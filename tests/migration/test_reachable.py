"""The pages the devices reach: the union of their IOMMUs' mappings, once each."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from vmferry.devices.iommu import IovaMapping
from vmferry.machine.machine import Machine
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.reachable import reachable_bitmap, reachable_pages


def _machine(*maps: list[IovaMapping]) -> Machine:
    devices = [SimpleNamespace(iommu=SimpleNamespace(mappings=m)) for m in maps]
    return cast(Machine, SimpleNamespace(memory=SimpleNamespace(npages=4096), devices=devices))


def test_the_union_of_every_devices_mappings_once_each() -> None:
    a = [IovaMapping(0, 3 * PAGE_SIZE, 10 * PAGE_SIZE), IovaMapping(1 << 20, PAGE_SIZE, 0)]
    b = [IovaMapping(0, 4 * PAGE_SIZE, 11 * PAGE_SIZE)]  # overlaps a's pages 11-12
    m = _machine(a, b, [])
    assert reachable_pages(m).tolist() == [0, 10, 11, 12, 13, 14]
    assert reachable_bitmap(m).count() == 6


def test_no_device_reaches_nothing() -> None:
    assert reachable_pages(_machine()).size == 0
    assert reachable_bitmap(cast(Any, _machine([]))).count() == 0
