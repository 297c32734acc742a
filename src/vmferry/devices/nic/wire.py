"""Frames on the uplink: Ethernet frames carried in UDP datagrams between host switches
and outside peers, and the announce a switch sends when a VF's MAC arrives on its host.

Datagram: ``b"VFRY" | u8 version | u8 kind | u8 hops | u8 0 | body``. DATA and FORWARD
carry one Ethernet frame. FORWARD is a frame relayed by a switch that no longer owns the
destination MAC; it carries the address the frame first came from (IPv4, port), so the
receiver learns where the sender really is. ANNOUNCE carries the new owner's uplink
address and a RARP frame from the MAC, as QEMU's self-announce sends.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MAGIC = b"VFRY"
WIRE_VERSION = 1
KIND_DATA, KIND_FORWARD, KIND_ANNOUNCE = 1, 2, 3
HEAD = struct.Struct("<4sBBBx")
ANNOUNCE_ADDR = struct.Struct("<4sH")
BROADCAST = b"\xff" * 6
ETH_P_8021Q = 0x8100
ETH_P_RARP = 0x8035

Addr = tuple[str, int]


class WireError(ValueError):
    """A datagram that is not a vmferry uplink datagram, or is malformed."""


@dataclass(frozen=True)
class Datagram:
    kind: int
    hops: int
    frame: bytes
    origin: Addr | None = None  # ANNOUNCE: where the MAC lives now; FORWARD: the sender


def encode(kind: int, frame: bytes, *, hops: int = 0, origin: Addr | None = None) -> bytes:
    head = HEAD.pack(MAGIC, WIRE_VERSION, kind, hops)
    if kind in (KIND_ANNOUNCE, KIND_FORWARD):
        assert origin is not None
        ip = ipaddress.IPv4Address(origin[0]).packed
        return head + ANNOUNCE_ADDR.pack(ip, origin[1]) + frame
    return head + frame


def decode(data: bytes) -> Datagram:
    if len(data) < HEAD.size + 14:
        raise WireError(f"datagram of {len(data)} bytes is too short")
    magic, version, kind, hops = HEAD.unpack_from(data)
    if magic != MAGIC or version != WIRE_VERSION:
        raise WireError(f"not a vmferry datagram (magic {magic!r}, version {version})")
    if kind in (KIND_ANNOUNCE, KIND_FORWARD):
        ip, port = ANNOUNCE_ADDR.unpack_from(data, HEAD.size)
        origin = (str(ipaddress.IPv4Address(ip)), port)
        return Datagram(kind, hops, data[HEAD.size + ANNOUNCE_ADDR.size :], origin)
    if kind != KIND_DATA:
        raise WireError(f"unknown datagram kind {kind}")
    return Datagram(kind, hops, data[HEAD.size :])


def rarp_frame(mac: bytes) -> bytes:
    """A RARP request from ``mac`` to broadcast (what QEMU's announce puts on the wire)."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return BROADCAST + mac + struct.pack("!H", ETH_P_RARP) + body


def dst_mac(frame: bytes) -> bytes:
    return frame[0:6]


def src_mac(frame: bytes) -> bytes:
    return frame[6:12]


def vlan_of(frame: bytes) -> int:
    """The 802.1Q VLAN id of a frame, 0 if untagged."""
    if len(frame) >= 18 and struct.unpack_from("!H", frame, 12)[0] == ETH_P_8021Q:
        return int(struct.unpack_from("!H", frame, 14)[0]) & 0xFFF
    return 0


def untag(frame: bytes) -> bytes:
    return frame[:12] + frame[16:] if vlan_of(frame) else frame


def tag(frame: bytes, vlan: int) -> bytes:
    if not vlan:
        return frame
    return frame[:12] + struct.pack("!HH", ETH_P_8021Q, vlan & 0xFFF) + frame[12:]
