"""The frames a traffic peer and ``netecho`` exchange (guests/netecho.c speaks the same).

Ethernet header, EtherType 0x88B5 (local experimental), then ``u32 magic, u32 flow,
u64 seq, u64 sent_ns`` and a body that depends only on ``seq``. netecho answers a PING
with an ECHO: MACs swapped, magic changed, header kept, every body byte XOR 0x5A — so
the peer checks each echo's content without keeping what it sent. A STOP asks netecho to
end; it answers with a RESULT frame (its counters) and prints its RESULT line.
"""

from __future__ import annotations

import struct

ETHERTYPE = 0x88B5
MAGIC_PING, MAGIC_ECHO = 0x50544656, 0x45544656  # "VFTP", "VFTE"
MAGIC_STOP, MAGIC_RESULT = 0x53544656, 0x52544656  # "VFTS", "VFTR"
HEAD = struct.Struct("<IIQQ")
ETH = struct.Struct("!6s6sH")
RESULT_BODY = struct.Struct("<QQQQ")  # frames received, echoed, bad frames, RESULT
ECHO_XOR = 0x5A
PATTERN_PERIOD = 251  # body = PATTERN[seq % 251 :][:n]
MAX_BODY = 9000
PATTERN = bytes(range(256)) * ((MAX_BODY + PATTERN_PERIOD) // 256 + 1)
PATTERN_ECHO = bytes(b ^ ECHO_XOR for b in PATTERN)
MASK64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """The same 64-bit finaliser netecho uses."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK64
    return z ^ (z >> 31)


def body(seq: int, n: int, *, echo: bool = False) -> bytes:
    off = seq % PATTERN_PERIOD
    return (PATTERN_ECHO if echo else PATTERN)[off : off + n]


def ping(dst: bytes, src: bytes, seq: int, sent_ns: int, size: int, flow: int = 0) -> bytes:
    """A PING frame of ``size`` bytes in all (at least the headers)."""
    n = max(0, size - ETH.size - HEAD.size)
    return (
        ETH.pack(dst, src, ETHERTYPE)
        + HEAD.pack(MAGIC_PING, flow, seq, sent_ns & MASK64)
        + body(seq, n)
    )


def stop(dst: bytes, src: bytes, sent: int) -> bytes:
    return ETH.pack(dst, src, ETHERTYPE) + HEAD.pack(MAGIC_STOP, 0, sent, 0)


class ResultHash:
    """netecho's RESULT: an order-independent hash of the sequence numbers it answered."""

    def __init__(self) -> None:
        self.count = self.total = self.xor = 0

    def add(self, seq: int) -> None:
        self.count += 1
        self.total = (self.total + mix64((seq + 0x9E3779B97F4A7C15) & MASK64)) & MASK64
        self.xor ^= mix64(seq ^ 0x5555555555555555)

    def value(self) -> int:
        return mix64(mix64(self.total ^ self.count) ^ self.xor ^ 0x6E65746563686F)
