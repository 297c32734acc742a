"""The VF's register map and descriptor formats (docs/devices/nic.md is the data sheet).

Modelled on an Intel X710 (i40e) virtual function as a DPDK driver sees it: per-queue
RX/TX descriptor rings in guest memory with head/tail registers, 16-byte descriptors
whose status the device writes back, statistics counters, an interrupt cause register
that clears on read, and an RX buffer size the driver writes once and cannot read back
(on the X710 it lives in the queue context the PF programs).
"""

from __future__ import annotations

import struct

ID = 0x46563758  # "X7VF"
VERSION = 1
MAX_QUEUES = 4
MAX_VFS = 16  # sriov_totalvfs of this PF
MIN_RING, MAX_RING = 8, 4096
MIN_RX_BUF, MAX_RX_BUF = 256, 16384  # RX_BUF_SIZE: a multiple of 128 in this range
MAX_FRAME = 9216  # jumbo frames; TX descriptors longer than this are an error
MIN_FRAME = 14  # an Ethernet header

# Global registers (32-bit; 64-bit counters as two accesses, low half first).
REG_ID, REG_VERSION, REG_NUM_QUEUES, REG_CTRL = 0x00, 0x04, 0x08, 0x0C
REG_MAC_LO, REG_MAC_HI, REG_PORT_VLAN = 0x10, 0x14, 0x18
REG_RX_BUF_SIZE = 0x1C  # write-only
REG_ICR = 0x20  # interrupt cause, clear on read
REG_STATUS, REG_ERROR_CODE = 0x24, 0x28
REG_STATS = 0x40  # eight 64-bit counters, in STAT_NAMES order
STAT_NAMES = (
    "rx_packets",
    "rx_bytes",
    "tx_packets",
    "tx_bytes",
    "rx_no_queue",  # frames for a queue that is not enabled, dropped
    "rx_oversize",  # frames longer than RX_BUF_SIZE, dropped
    "tx_errors",
    "rx_filtered",  # frames the MAC/VLAN filter refused
)

# Per-queue registers: queue q at QUEUE_BASE + q * QUEUE_STRIDE.
QUEUE_BASE, QUEUE_STRIDE = 0x100, 0x40
Q_RX_BASE, Q_RX_LEN, Q_RX_HEAD, Q_RX_TAIL, Q_RX_ENABLE = 0x00, 0x08, 0x0C, 0x10, 0x14
Q_TX_BASE, Q_TX_LEN, Q_TX_HEAD, Q_TX_TAIL, Q_TX_ENABLE = 0x20, 0x28, 0x2C, 0x30, 0x34

CTRL_ENABLE = 1  # link up: the port takes frames from the switch
CTRL_BROADCAST = 2  # accept broadcast frames (a filter bit)
STATUS_LINK_UP, STATUS_ERROR = 1, 2
ICR_RX, ICR_TX, ICR_ERROR = 1, 2, 4
ERR_NONE, ERR_BAD_TX_DESC, ERR_DMA_FAULT, ERR_BAD_RING = 0, 1, 2, 3

# Descriptors: 16 bytes. RX as posted: u64 buffer address, u64 0. RX as written back:
# u64 buffer address (unchanged), u64 status word. TX: u64 buffer address, u64 command
# word; the device writes the command word back with DD set when the frame has left.
DESC = struct.Struct("<QQ")
DESC_SIZE = DESC.size
RXD_DD = 1 << 16  # status word: bits 0-15 length, 16 DD, 17 EOP, 32-47 RSS queue hint
RXD_EOP = 1 << 17
TXD_EOP = 1 << 16  # command word: bits 0-15 length, 16 EOP, 17 RS; DD (bit 63) written back
TXD_RS = 1 << 17
TXD_DD = 1 << 63


def queue_reg(q: int, reg: int) -> int:
    return QUEUE_BASE + q * QUEUE_STRIDE + reg


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6:
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} is not six hex bytes a:b:c:d:e:f") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    return mac
