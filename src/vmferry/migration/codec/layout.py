"""The stream's byte layout: the stream and section headers, the section tags and flags,
and the layouts of the bulk payloads (RAM, DEVD, VRFY), which ram.py and devices.py pack
with numpy.

Stream layout (little-endian):

    stream header  magic "VMFERRY\\n" | u32 version | u32 flags | u64 xxh64(previous 16 bytes)
    section*       tag[4] | u32 flags | u64 length | u32 seq | u32 reserved | u64 checksum
                   payload[length]

The format has one VERSION: a stream of another is refused whole, with both numbers.
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

from vmferry.errors import StreamError

MAGIC = b"VMFERRY\n"
# 2: one CONF schema for live migration and save files (flat, every key present), and
# one DEVS schema (identity and figures per device) in both.
# 3: CONF's verify is a mode (on | strict | off) with the digest seed and hold-output;
# the audit after resume (AUDIT_HEAD chunks on the reply path).
VERSION = 3
STREAM_HEADER = struct.Struct("<8sII")
STREAM_HEADER_SIZE = STREAM_HEADER.size + 8
SECTION_HEADER = struct.Struct("<4sIQII")
SECTION_HEADER_SIZE = SECTION_HEADER.size + 8

CONF = b"CONF"  # machine config and migration set-up (JSON)
RAM = b"RAM\0"  # a batch of pages
ROUND = b"RND\0"  # end of a pre-copy round (JSON: round number and counts)
CPUS = b"CPUS"  # vCPU and VM state (JSON)
DEVD = b"DEVD"  # a chunk of one device's migration stream (pre-copy or stop-copy)
DEVS = b"DEVS"  # device summary (JSON list: identity and bytes per device)
VRFY = b"VRFY"  # page and CPU-state digests taken at switchover
END = b"END\0"  # the stream is complete
CHAN = b"CHAN"  # first section of an extra channel: which migration, which channel
CEND = b"CEND"  # an extra channel has sent all its pages
ABRT = b"ABRT"  # the source abandons the migration (JSON: reason, cancelled); nothing follows
# Post-copy only (no other stream has one, so theirs are unchanged): the pages the
# destination must not trust, as a bitmap; END follows, then the pages on their channels.
PCPY = b"PCPY"

SECTION_NAMES = {
    CONF: "CONF",
    RAM: "RAM",
    ROUND: "RND",
    CPUS: "CPUS",
    DEVD: "DEVD",
    DEVS: "DEVS",
    VRFY: "VRFY",
    END: "END",
    CHAN: "CHAN",
    CEND: "CEND",
    ABRT: "ABRT",
    PCPY: "PCPY",
}
MAX_PAYLOAD = {
    CONF: 1 << 20,
    RAM: 1 << 30,
    ROUND: 1 << 16,
    CPUS: 16 << 20,
    DEVD: 16 << 20,
    DEVS: 1 << 20,
    VRFY: 1 << 30,
    END: 0,
    CHAN: 1 << 12,
    CEND: 1 << 12,
    ABRT: 1 << 12,
    PCPY: 8 + (1 << 25),  # head and a bitmap of 1 TiB of pages
}
FLAG_ZSTD = 1  # the payload is one zstd frame
# The page data of this RAM section was read from a running guest, which may change a page
# while it is being sent: the checksum covers the header and the run table only. Such a
# page was dirtied, so it is sent again later; the switchover digests cover the end result.
# Only a live connection carries these: a file is read long after, with nothing resent and
# perhaps no digests, so its pre-copy pages are copied first and checksummed whole.
FLAG_LIVE = 2
KNOWN_FLAGS = FLAG_ZSTD | FLAG_LIVE

# RAM payload: head (run count, reserved), the run table, then the data of non-zero runs.
RAM_HEAD = struct.Struct("<II")
RUN_DTYPE = np.dtype([("first", "<u8"), ("npages", "<u4"), ("flags", "<u4")])
RUN_ZERO = 1  # a run of zero pages: no data follows for it
# DEVD payload: head, then a chunk of that device's own migration stream.
DEVD_HEAD = struct.Struct("<II")  # device index, phase
PHASE_PRECOPY, PHASE_STOP_COPY = 0, 1
# VRFY payload: head, then page numbers (<i8) and their digests (<u8).
VRFY_HEAD = struct.Struct("<QQQ")  # key seed, page count, cpu digest
# An audit chunk (reply path, after resume): head, then `count` digests (<u8), dense.
AUDIT_HEAD = struct.Struct("<QQQQ")  # first page, count, guest RAM's pages, xxh64(digests)
# PCPY payload: head, then the owed pages' bitmap as u64 words (KVM's layout).
PCPY_HEAD = struct.Struct("<Q")  # guest RAM's pages
# A post-copy page channel's first bytes: which migration, which role (urgent: requests
# and their answers; background: the push).
POSTCOPY_HELLO = struct.Struct("<8sI32s")  # magic, role, migration id (hex)
POSTCOPY_MAGIC = b"VMFPCOPY"
ROLE_URGENT, ROLE_BACKGROUND = 1, 2
ROLE_RESUME = 3  # after a broken link: the new main connection (the present bitmap back)
# 64 MiB of RAM per chunk (128 KiB of digests): the source digests one in ~15 ms, well
# inside the destination's wait for each message (x-peer-timeout, 100 ms at the least).
MAX_AUDIT_PAGES = 1 << 14


def section_name(tag: bytes) -> str:
    return SECTION_NAMES.get(tag, repr(tag))


# ---- the stream header


def encode_stream_header() -> bytes:
    head = STREAM_HEADER.pack(MAGIC, VERSION, 0)
    return head + struct.pack("<Q", xxhash.xxh64_intdigest(head))


def check_stream_header(raw: bytes | bytearray) -> None:
    """Refuse what is not a vmferry stream of this format version."""
    magic, version, _flags = STREAM_HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise StreamError(f"not a vmferry stream: magic is {bytes(magic)!r}, want {MAGIC!r}")
    (check,) = struct.unpack_from("<Q", raw, STREAM_HEADER.size)
    if check != xxhash.xxh64_intdigest(bytes(raw[: STREAM_HEADER.size])):
        raise StreamError("stream header checksum mismatch: the header is corrupt")
    if version != VERSION:
        rel = "newer than" if version > VERSION else "older than"
        raise StreamError(
            f"stream format version {version} is {rel} this vmferry's ({VERSION}); "
            "use a matching vmferry"
        )
