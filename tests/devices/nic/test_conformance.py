"""The device conformance kit, run on the VF (as tests/devices/test_dmaengine.py does)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.devices.nic import helpers as h
from vmferry.devices.base import DeviceModel
from vmferry.devices.iommu import DirtyTracking
from vmferry.devices.nic import close_host
from vmferry.devices.nic import regs as r
from vmferry.devices.nic.vf import VirtualFunction
from vmferry.memory import GuestMemory
from vmferry.testing import conformance

_host: dict[str, Path] = {}


def host() -> Path:
    if "h" not in _host:
        _host["h"] = h.make_host(Path(tempfile.mkdtemp(prefix="vmferry-nic-")))
    return _host["h"]


@pytest.fixture(scope="module", autouse=True)
def _switches() -> Any:
    yield
    if "h" in _host:
        close_host(_host.pop("h"))


def make(memory: GuestMemory, mode: DirtyTracking) -> DeviceModel:
    return h.make_vf(host(), memory, mode)


def exercise(dev: DeviceModel, rnd: int) -> None:
    """Frames in (RX DMA into posted buffers) and frames out (TX DMA reads)."""
    assert isinstance(dev, VirtualFunction)
    if rnd == 0:
        h.program(dev)
    w = h.Wire(dev)
    try:
        before = h.stat(dev, "rx_packets")
        for i in range(4):
            w.send(h.frame_to(dev, 10 * rnd + i))
        h.wait_for(lambda: h.stat(dev, "rx_packets") == before + 4, "4 frames received")
        h.repost(dev)
        sent = h.stat(dev, "tx_packets")
        h.transmit(dev, [h.frame_to(dev, 7)[6:12] + dev.mac + b"\x88\xb5" + bytes(50)] * 2)
        h.wait_for(lambda: h.stat(dev, "tx_packets") == sent + 2, "2 frames sent")
    finally:
        w.close()


def fingerprint(dev: DeviceModel) -> Any:
    assert isinstance(dev, VirtualFunction)
    regs = dev.registers()
    return regs, dev.mmio_read(r.REG_MAC_LO, 4)


DUT = conformance.DeviceUnderTest(make=make, exercise=exercise, fingerprint=fingerprint)


@pytest.mark.parametrize("check", conformance.ALL_CHECKS, ids=lambda c: c.__name__)
def test_conformance(check: Any) -> None:
    check(DUT)
