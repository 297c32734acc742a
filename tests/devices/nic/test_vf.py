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
from vmferry.errors import ConfigError
from vmferry.memory import GuestMemory
from vmferry.migration.devices import DestinationDevices, SourceDevices, blockers
from vmferry.traffic.lab import close_hosts, make_hosts


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


def test_mediator_reports_every_buffer_written_when_the_ring_goes_round(
    tmp_path: Path, memory: GuestMemory
) -> None:
    """More frames between two syncs than the ring has slots (a slow sync on a loaded
    host): each buffer written since the last report is in the next, not only those
    between the old head and the tail."""
    host = h.make_host(tmp_path / "host")
    dev = h.make_vf(host, memory, DirtyTracking.MEDIATED)
    w = h.Wire(dev)
    try:
        h.program(dev)
        dev.mediated_dirty_pages()  # tracking begins
        for batch in range(2):  # 20 frames through a 16-slot ring, reposted in between
            for i in range(10):
                w.send(h.frame_to(dev, 10 * batch + i))
            h.wait_for(lambda b=batch: h.stat(dev, "rx_packets") == 10 * (b + 1), "10 frames")
            h.repost(dev)
        buffers = {(h.RX_BUFS + h.BUF * s) >> 12 for s in range(h.RING)}
        assert buffers <= set(dev.mediated_dirty_pages().tolist())
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
        # A rollback whose last resort is a reset: the VF runs here, so it takes its MAC
        # back and tells the peer.
        dev.reset()
        assert dev.port.moved_to is None and dev.port.running
        while (back := peer.recv()).kind != wire.KIND_ANNOUNCE:
            pass
        assert back.origin == dev.switch.address
    finally:
        peer.close()
        new_home.close()
        dev.close()
        close_host(a)


# ---- a rollback after resume, with the destination's output held


class Moved:
    """A VF migrated from host a to host b by its own stream (no VM): ``src`` stopped at
    the switchover, ``dst`` loaded and started with its output held; ``peer`` on the
    uplink has talked to the VM on a and has heard b's announce."""

    def __init__(self, root: Path) -> None:
        self.hosts = make_hosts(root)
        self.mem = [GuestMemory(64 << 20), GuestMemory(64 << 20)]
        self.src = h.make_vf(self.hosts[0], self.mem[0], DirtyTracking.IOMMU)
        self.dst: VirtualFunction | None = None
        self.peer = h.Wire(self.src)
        h.program(self.src)
        self.peer.send(h.frame_to(self.src, 1))  # a learns the peer
        h.wait_for(lambda: h.stat(self.src, "rx_packets") == 1, "the first frame")
        self.source = SourceDevices([self.src])
        self.source.start()
        self.src.set_state(MigState.STOP_COPY)  # the switchover
        stream = b""
        while chunk := self.src.read_data(1 << 16):
            stream += chunk
        self.dst = h.make_vf(self.hosts[1], self.mem[1], DirtyTracking.IOMMU)
        self.dest = DestinationDevices([self.dst])
        self.dest.begin()
        self.dst.write_data(stream)
        self.dest.commit()
        self.dest.hold_output()  # just before the guest starts there
        self.dest.start()  # RUNNING: b announces the MAC
        moved = self.expect(wire.KIND_ANNOUNCE)  # a floods it on to the peer
        assert moved.origin == self.dst.switch.address
        self.peer.to = moved.origin

    def expect(self, kind: int) -> wire.Datagram:
        """The next datagram of ``kind`` the peer gets (others, e.g. repeats, skipped)."""
        while (d := self.peer.recv()).kind != kind:
            pass
        return d

    def echo(self, dev: VirtualFunction, n: int) -> bytes:
        """The guest on ``dev`` answers frame ``n``."""
        reply = PEER_MAC + dev.mac + b"\x88\xb5" + bytes([n]) * 60
        h.transmit(dev, [reply])
        return reply

    def close(self) -> None:
        self.peer.close()
        for d in (self.src, self.dst):
            if d is not None:
                d.close()
        for m in self.mem:
            m.close()
        close_hosts(self.hosts)


PEER_MAC = bytes([2, 0x70, 0, 0, 0, 9])  # helpers.frame_to's sender


@pytest.fixture
def moved(tmp_path: Path) -> Iterator[Moved]:
    m = Moved(tmp_path)
    yield m
    m.close()


def test_held_output_reaches_the_peer_once_when_the_audit_passes(moved: Moved) -> None:
    dst = moved.dst
    assert dst is not None
    moved.peer.send(h.frame_to(dst, 2))  # frames reach the destination during the audit
    h.wait_for(lambda: h.stat(dst, "rx_packets") == 2, "the frame at the destination")
    held = moved.echo(dst, 2)
    h.wait_for(lambda: h.stat(dst, "tx_packets") == 1, "the echo transmitted")
    assert dst.port.hold is not None and list(dst.port.hold.frames) == [held]
    moved.dest.release_output()
    assert moved.expect(wire.KIND_DATA).frame == held
    after = moved.echo(dst, 3)  # no longer held: straight out
    assert moved.expect(wire.KIND_DATA).frame == after, "the held echo came twice"
    assert moved.dest.output_figures() == [
        {"name": dst.name, "output-held": 1, "output-released": 1, "output-dropped": 0,
         "output-overflow": 0}
    ]  # fmt: skip
    moved.source.release()


def test_a_rollback_drops_held_output_and_the_mac_comes_back(moved: Moved) -> None:
    dst, src = moved.dst, moved.src
    assert dst is not None
    moved.peer.send(h.frame_to(dst, 2))
    h.wait_for(lambda: h.stat(dst, "rx_packets") == 2, "the frame at the destination")
    moved.echo(dst, 2)
    h.wait_for(lambda: h.stat(dst, "tx_packets") == 1, "the echo transmitted")
    # The audit fails: the destination stops and drops, then the source runs again.
    moved.dest.drop_output()
    assert dst.state is MigState.STOP and dst.stats["output_dropped"] == 1
    moved.source.rollback()
    back = moved.expect(wire.KIND_ANNOUNCE)
    assert back.origin == src.switch.address
    h.wait_for(lambda: dst.port.moved_to == src.switch.address, "b to give the MAC up")
    moved.peer.send(h.frame_to(src, 3))  # still sent to b: b hands it to a
    moved.peer.to = src.switch.address
    moved.peer.send(h.frame_to(src, 4))
    h.wait_for(lambda: h.stat(src, "rx_packets") == 3, "both frames at the source")
    assert h.stat(dst, "rx_packets") == 2, "the stopped destination took a frame"
    answer = moved.echo(src, 4)
    assert moved.expect(wire.KIND_DATA).frame == answer, "a dropped frame reached the peer"
    assert dst.port.stale_announces == 0 and src.port.moved_to is None


def test_a_dma_window_limits_what_the_vf_can_reach(tmp_path: Path, memory: GuestMemory) -> None:
    host = h.make_host(tmp_path / "host")
    dev = h.make_vf(host, memory, DirtyTracking.IOMMU, ",x-dma-window=1M:3M")
    w = h.Wire(dev)
    try:
        pages = dev.iommu.mapped_pages()
        assert pages[0] == (1 << 20) >> 12 and pages[-1] == ((3 << 20) >> 12) - 1
        assert dev.identity.config["dma-window"] == [1 << 20, 3 << 20]
        h.program(dev)  # rings at 1M, RX buffers at 2M: inside
        w.send(h.frame_to(dev, 1))
        h.wait_for(lambda: h.stat(dev, "rx_packets") == 1, "a frame into the window")
        h.transmit(dev, [h.frame_to(dev, 2)])  # TX buffers at 3M: outside
        h.wait_for(lambda: dev.mmio_read(r.REG_ERROR_CODE, 4) == r.ERR_DMA_FAULT, "a DMA fault")
    finally:
        w.close()
        dev.close()
        close_host(host)
    for bad in ("3M:1M", "1M", "1M:x", "100M:200M", "1000:8192"):
        with pytest.raises(ConfigError, match="x-dma-window"):
            h.make_vf(host, memory, DirtyTracking.IOMMU, f",x-dma-window={bad}")
    close_host(host)


def test_a_frame_handed_on_between_the_peek_and_the_take_leaves_the_engine_running(
    tmp_path: Path, memory: GuestMemory
) -> None:
    """The port's backlog goes to the new owner (an announce, on the uplink thread)
    while the engine's pass is between looking at the head frame and taking it: the
    engine must not die on the empty take (the VF would never receive again)."""
    dev = vf(tmp_path, memory)
    w = h.Wire(dev)
    take = dev.switch.take
    moved: list[bool] = []

    def take_after_a_hand_over(port: object, n: int) -> list[bytes]:
        if not moved:
            moved.append(True)
            with dev.switch._lock:  # what _announced does with the port's backlog
                dev.port.frames.clear()
        return take(dev.port, n)

    dev.switch.take = take_after_a_hand_over  # type: ignore[method-assign]
    try:
        h.program(dev)
        w.send(h.frame_to(dev, 1))
        h.wait_for(lambda: moved, "the first take")
        w.send(h.frame_to(dev, 2))
        h.wait_for(lambda: h.stat(dev, "rx_packets") == 1, "the next frame")
        assert dev._worker.is_alive()
        assert memory.read_gpa(h.RX_BUFS + 14, 1)[0] == 2
    finally:
        w.close()
        dev.close()
        close_host(tmp_path / "host")
