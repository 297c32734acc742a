"""The VF: registers, RX/TX DMA, VLAN filtering, the switch buffer while quiesced, the
mediator's reports, and the announce that moves a MAC between switches."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.devices.nic import helpers as h
from vmferry.devices.fsm import MigState
from vmferry.devices.iommu import DirtyTracking
from vmferry.devices.nic import close_host, wire
from vmferry.devices.nic import regs as r
from vmferry.devices.nic.vf import VirtualFunction
from vmferry.memory import GuestMemory
from vmferry.migration.devices import blockers


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    m = GuestMemory(64 << 20)
    yield m
    m.close()


def vf(tmp_path: Path, memory: GuestMemory, **kw: int) -> VirtualFunction:
    host = h.make_host(tmp_path / "host", **kw)
    return h.make_vf(host, memory, DirtyTracking.IOMMU)


def test_registers_identity_write_only_and_clear_on_read(
    tmp_path: Path, memory: GuestMemory
) -> None:
    dev = vf(tmp_path, memory, vlan=7, queues=2)
    try:
        assert dev.mmio_read(r.REG_ID, 4) == r.ID
        assert dev.mmio_read(r.REG_NUM_QUEUES, 4) == 2
        mac = dev.mmio_read(r.REG_MAC_LO, 4).to_bytes(4, "little")
        mac += dev.mmio_read(r.REG_MAC_HI, 4).to_bytes(2, "little")
        assert mac == dev.mac and dev.mmio_read(r.REG_PORT_VLAN, 4) == 7
        dev.mmio_write(r.REG_RX_BUF_SIZE, 4, 4096)
        assert dev.mmio_read(r.REG_RX_BUF_SIZE, 4) == 0 and dev.registers()["rx_buf_size"] == 4096
        dev.mmio_write(r.REG_RX_BUF_SIZE, 4, 1000)  # not a multiple of 128
        assert dev.mmio_read(r.REG_ERROR_CODE, 4) == r.ERR_BAD_RING
        dev.mmio_write(r.queue_reg(0, r.Q_RX_LEN), 4, 12)  # not a power of two
        dev.mmio_write(r.queue_reg(0, r.Q_RX_ENABLE), 4, 1)
        assert dev.mmio_read(r.queue_reg(0, r.Q_RX_ENABLE), 4) == 0
    finally:
        dev.close()
        close_host(tmp_path / "host")


def test_frames_in_and_out_by_dma_with_vlan_and_counters(
    tmp_path: Path, memory: GuestMemory
) -> None:
    dev = vf(tmp_path, memory, vlan=10)
    w = h.Wire(dev)
    try:
        h.program(dev)
        w.send(h.frame_to(dev, 1))  # untagged: not this VF's VLAN
        fr = h.frame_to(dev, 2)
        w.send(wire.tag(fr, 10))
        h.wait_for(lambda: h.stat(dev, "rx_packets") == 1, "the tagged frame")
        status = r.DESC.unpack(memory.read_gpa(h.RX_RING, 16))[1]
        assert status & r.RXD_DD and status & 0xFFFF == len(fr)
        assert memory.read_gpa(h.RX_BUFS, len(fr)) == fr  # VLAN tag stripped
        assert dev.mmio_read(r.REG_ICR, 4) & r.ICR_RX
        assert dev.mmio_read(r.REG_ICR, 4) == 0  # cleared by the read
        reply = fr[6:12] + dev.mac + fr[12:]
        h.transmit(dev, [reply])
        out = w.recv()
        assert out.kind == wire.KIND_DATA and out.frame == wire.tag(reply, 10)
        assert r.DESC.unpack(memory.read_gpa(h.TX_RING, 16))[1] & r.TXD_DD
        assert h.stat(dev, "tx_bytes") == len(reply)
    finally:
        w.close()
        dev.close()
        close_host(tmp_path / "host")


def test_quiesced_vf_leaves_frames_in_the_switch_up_to_its_bound(
    tmp_path: Path, memory: GuestMemory
) -> None:
    dev = vf(tmp_path, memory, buffer=5)
    w = h.Wire(dev)
    try:
        h.program(dev)
        dev.set_state(MigState.RUNNING_P2P)
        for i in range(8):
            w.send(h.frame_to(dev, i))
        h.wait_for(lambda: dev.port.dropped == 3, "3 frames over the bound")
        assert h.stat(dev, "rx_packets") == 0 and len(dev.port.frames) == 5
        dev.set_state(MigState.RUNNING)
        h.wait_for(lambda: h.stat(dev, "rx_packets") == 5, "the 5 buffered frames")
        got = [memory.read_gpa(h.RX_BUFS + h.BUF * s + 14, 1)[0] for s in range(5)]
        assert got == [0, 1, 2, 3, 4]  # in order, none of the dropped ones
    finally:
        w.close()
        dev.close()
        close_host(tmp_path / "host")


def test_mediator_reports_posted_buffers_before_the_device_writes(
    tmp_path: Path, memory: GuestMemory
) -> None:
    host = h.make_host(tmp_path / "host")
    dev = h.make_vf(host, memory, DirtyTracking.MEDIATED)
    w = h.Wire(dev)
    try:
        h.program(dev)
        first = set(dev.mediated_dirty_pages().tolist())
        posted = {(h.RX_BUFS + h.BUF * s) >> 12 for s in range(h.RING - 1)}
        assert posted | {h.RX_RING >> 12, h.TX_RING >> 12} <= first
        w.send(h.frame_to(dev, 1))
        h.wait_for(lambda: h.stat(dev, "rx_packets") == 1, "a frame")
        # Slot 0 was written since the last report; the rest are still posted.
        again = set(dev.mediated_dirty_pages().tolist())
        assert h.RX_BUFS >> 12 in again and posted <= again
    finally:
        w.close()
        dev.close()
        close_host(host)


def test_a_vf_without_migration_support_is_a_blocker_naming_it(
    tmp_path: Path, memory: GuestMemory
) -> None:
    host = h.make_host(tmp_path / "host")
    dev = h.make_vf(host, memory, DirtyTracking.IOMMU, ",migration=off")
    try:
        assert blockers([dev]) == ["vf0 (pf0 VF 0) does not support migration (no STOP_COPY)"]
    finally:
        dev.close()
        close_host(host)


def test_announce_moves_the_mac_and_the_buffer_follows(tmp_path: Path, memory: GuestMemory) -> None:
    a = h.make_host(tmp_path / "a")
    dev = h.make_vf(a, memory, DirtyTracking.IOMMU)
    peer = h.Wire(dev)
    new_home = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    new_home.bind(("127.0.0.1", 0))
    new_home.settimeout(2)
    try:
        h.program(dev)
        dev.set_state(MigState.STOP)  # migrated away: frames wait in the port
        peer.send(h.frame_to(dev, 42))
        h.wait_for(lambda: len(dev.port.frames) == 1, "a buffered frame")
        there = new_home.getsockname()
        announce = wire.encode(wire.KIND_ANNOUNCE, wire.rarp_frame(dev.mac), origin=there)
        new_home.sendto(announce, dev.switch.address)
        fwd = wire.decode(new_home.recvfrom(65536)[0])
        assert fwd.kind == wire.KIND_FORWARD and fwd.frame == h.frame_to(dev, 42)
        assert fwd.origin == peer.sock.getsockname()  # where the sender really is
        flooded = peer.recv()  # the switch floods the announce on to who it learned
        assert flooded.kind == wire.KIND_ANNOUNCE and flooded.origin == there
        peer.send(h.frame_to(dev, 43))  # late frames follow the MAC too
        assert wire.decode(new_home.recvfrom(65536)[0]).frame == h.frame_to(dev, 43)
        assert dev.port.moved_to == there
    finally:
        peer.close()
        new_home.close()
        dev.close()
        close_host(a)
