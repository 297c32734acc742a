"""A VF on a private host, driven from the test as a guest driver would."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from vmferry.devices.base import DeviceModel
from vmferry.devices.iommu import DirtyTracking
from vmferry.devices.nic import HostConfig, on_host, wire
from vmferry.devices.nic import regs as r
from vmferry.devices.nic.vf import VirtualFunction
from vmferry.devices.registry import DeviceSpec, create_device
from vmferry.memory import GuestMemory

RX_RING, TX_RING = 0x100000, 0x101000
RX_BUFS, TX_BUFS = 0x200000, 0x300000
RING, BUF = 16, 2048


def make_host(root: Path, *, vlan: int = 0, buffer: int = 4096, queues: int = 1) -> Path:
    HostConfig(root).set_numvfs("pf0", 2, uplink="127.0.0.1:0", buffer=buffer)
    HostConfig(root).config_vf("pf0", 0, vlan=vlan, queues=queues)
    return root


def make_vf(
    host: Path, memory: GuestMemory, mode: DirtyTracking, extra: str = ""
) -> VirtualFunction:
    with on_host(host):
        dev = create_device(
            DeviceSpec.parse(f"vf,pf=pf0,index=0,dirty={mode.value}{extra}"), 0, memory
        )
    assert isinstance(dev, VirtualFunction)
    return dev


def program(dev: DeviceModel, q: int = 0) -> None:
    """Rings at fixed addresses, every RX buffer posted but one, link up."""
    mem = dev.iommu.memory
    for s in range(RING):
        mem.write_gpa(RX_RING + 16 * s, r.DESC.pack(RX_BUFS + BUF * s, 0))
    dev.mmio_write(r.REG_RX_BUF_SIZE, 4, BUF)
    dev.mmio_write(r.queue_reg(q, r.Q_RX_BASE), 8, RX_RING)
    dev.mmio_write(r.queue_reg(q, r.Q_RX_LEN), 4, RING)
    dev.mmio_write(r.queue_reg(q, r.Q_TX_BASE), 8, TX_RING)
    dev.mmio_write(r.queue_reg(q, r.Q_TX_LEN), 4, RING)
    dev.mmio_write(r.queue_reg(q, r.Q_RX_ENABLE), 4, 1)
    dev.mmio_write(r.queue_reg(q, r.Q_TX_ENABLE), 4, 1)
    dev.mmio_write(r.queue_reg(q, r.Q_RX_TAIL), 4, RING - 1)
    dev.mmio_write(r.REG_CTRL, 4, r.CTRL_ENABLE)


def frame_to(dev: VirtualFunction, n: int, size: int = 100) -> bytes:
    src = bytes([2, 0x70, 0, 0, 0, 9])
    return dev.mac + src + b"\x88\xb5" + bytes([n & 0xFF]) * (size - 14)


class Wire:
    """A socket on the switch's uplink: sends frames in, collects what comes out."""

    def __init__(self, dev: VirtualFunction) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2)
        self.to = dev.switch.address

    def send(self, frame: bytes) -> None:
        self.sock.sendto(wire.encode(wire.KIND_DATA, frame), self.to)

    def recv(self) -> wire.Datagram:
        return wire.decode(self.sock.recvfrom(65536)[0])

    def close(self) -> None:
        self.sock.close()


def stat(dev: DeviceModel, name: str) -> int:
    return dev.mmio_read(r.REG_STATS + 8 * r.STAT_NAMES.index(name), 8)


def wait_for(cond: object, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def repost(dev: DeviceModel, q: int = 0) -> None:
    """The driver hands every completed RX slot back (status cleared, tail moved)."""
    mem = dev.iommu.memory
    head = dev.mmio_read(r.queue_reg(q, r.Q_RX_HEAD), 4)
    for s in range(RING):
        mem.write_gpa(RX_RING + 16 * s, r.DESC.pack(RX_BUFS + BUF * s, 0))
    dev.mmio_write(r.queue_reg(q, r.Q_RX_TAIL), 4, (head - 1) % RING)


def transmit(dev: DeviceModel, frames: list[bytes], q: int = 0) -> None:
    mem = dev.iommu.memory
    tail = dev.mmio_read(r.queue_reg(q, r.Q_TX_TAIL), 4)
    for fr in frames:
        addr = TX_BUFS + BUF * tail
        mem.write_gpa(addr, fr)
        mem.write_gpa(TX_RING + 16 * tail, r.DESC.pack(addr, len(fr) | r.TXD_EOP | r.TXD_RS))
        tail = (tail + 1) % RING
    dev.mmio_write(r.queue_reg(q, r.Q_TX_TAIL), 4, tail)
