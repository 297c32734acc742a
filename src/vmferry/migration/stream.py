"""The vmferry stream: one format for save files and live migration.

Layout (little-endian):

    stream header  magic "VMFERRY\\n" | u32 version | u32 flags | u64 xxh64(previous 16 bytes)
    section*       tag[4] | u32 flags | u64 length | u32 seq | u32 reserved | u64 checksum
                   payload[length]

``checksum`` is xxh3-64 over the first 24 header bytes and the payload, so a flipped bit in
a length or a tag is caught too. Only a live RAM section leaves its page data out of it
(FLAG_LIVE); a file never holds one, so every byte of a file is checksummed. ``seq`` counts
sections from 0: a dropped or repeated section is an error. Sections come in a fixed grammar
(``MAIN_GRAMMAR``); anything else is an error that names the section, its number and its
byte offset.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from vmferry.errors import StreamError
from vmferry.migration.transport import Buffer, Sink, Source

MAGIC = b"VMFERRY\n"
VERSION = 1
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
}
FLAG_ZSTD = 1  # the payload is one zstd frame
# The page data of this RAM section was read from a running guest, which may change a page
# while it is being sent: the checksum covers the header and the run table only. Such a
# page was dirtied, so it is sent again later; the switchover digests cover the end result.
# Only a live connection carries these: a file is read long after, with nothing resent and
# perhaps no digests, so its pre-copy pages are copied first and checksummed whole.
FLAG_LIVE = 2
KNOWN_FLAGS = FLAG_ZSTD | FLAG_LIVE

# What may follow each section (None: the stream start), for the main stream (a save file
# is one) and for the extra channels of a multi-channel migration.
MAIN_GRAMMAR: dict[bytes | None, frozenset[bytes]] = {
    None: frozenset({CONF}),
    # A live source that gives up says so (ABRT) between any two sections before END.
    CONF: frozenset({RAM, ROUND, DEVD, CPUS, ABRT}),
    RAM: frozenset({RAM, ROUND, DEVD, CPUS, ABRT}),
    ROUND: frozenset({RAM, ROUND, DEVD, CPUS, ABRT}),
    DEVD: frozenset({RAM, ROUND, DEVD, CPUS, ABRT}),
    CPUS: frozenset({DEVS, ABRT}),
    DEVS: frozenset({VRFY, END, ABRT}),
    VRFY: frozenset({END, ABRT}),
    END: frozenset(),
    ABRT: frozenset(),
}
CHANNEL_GRAMMAR: dict[bytes | None, frozenset[bytes]] = {
    None: frozenset({CHAN}),
    CHAN: frozenset({RAM, CEND}),
    RAM: frozenset({RAM, CEND}),
    CEND: frozenset(),
}


def section_name(tag: bytes) -> str:
    return SECTION_NAMES.get(tag, repr(tag))


@dataclass(frozen=True)
class SectionHeader:
    tag: bytes
    flags: int
    length: int
    seq: int
    checksum: int
    offset: int  # byte offset of the header in the stream

    def describe(self) -> str:
        return f"section #{self.seq} {section_name(self.tag)} at byte {self.offset}"


class StreamWriter:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.seq = 0
        self.bytes_written = 0
        head = STREAM_HEADER.pack(MAGIC, VERSION, 0)
        self._emit([head + struct.pack("<Q", xxhash.xxh64_intdigest(head))])

    def _emit(self, bufs: Sequence[Buffer]) -> None:
        self.sink.write(bufs)
        self.bytes_written += sum(len(b) for b in bufs)

    def section(
        self, tag: bytes, payload: Sequence[Buffer], flags: int = 0, hashed: int | None = None
    ) -> None:
        """Write one section whose payload is the concatenation of ``payload``; only the
        first ``hashed`` buffers enter the checksum when given (see FLAG_LIVE)."""
        length = sum(memoryview(b).nbytes for b in payload)
        head = SECTION_HEADER.pack(tag, flags, length, self.seq, 0)
        h = xxhash.xxh3_64(head)
        for b in payload[:hashed]:
            h.update(b)
        self._emit([head + struct.pack("<Q", h.intdigest()), *payload])
        self.seq += 1


class StreamReader:
    """Reads and checks section headers; payloads are read by the caller through ``read``.

    ``sealed``: every section must be checksummed whole (a saved file), so a section with
    the live flag is refused before its payload is read."""

    def __init__(
        self,
        source: Source,
        grammar: dict[bytes | None, frozenset[bytes]] = MAIN_GRAMMAR,
        *,
        sealed: bool = False,
    ) -> None:
        self.source = source
        self.grammar = grammar
        self.sealed = sealed
        self.seq = 0
        self.last: bytes | None = None
        raw = bytearray(STREAM_HEADER_SIZE)
        try:
            source.readinto(memoryview(raw))
        except StreamError as e:
            raise StreamError(f"stream header is incomplete: {e}") from e
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

    def next_section(self) -> tuple[SectionHeader, xxhash.xxh3_64]:
        """Read the next section header; returns it and the running payload checksum."""
        offset = self.source.position
        raw = bytearray(SECTION_HEADER_SIZE)
        try:
            self.source.readinto(memoryview(raw))
        except StreamError as e:
            want = " or ".join(sorted(section_name(t) for t in self.grammar[self.last]))
            raise StreamError(f"stream ends before section #{self.seq} ({want}): {e}") from e
        tag, flags, length, seq, _ = SECTION_HEADER.unpack_from(raw)
        (checksum,) = struct.unpack_from("<Q", raw, SECTION_HEADER.size)
        hdr = SectionHeader(bytes(tag), flags, length, seq, checksum, offset)
        where = f"section #{self.seq} at byte {offset}"
        if hdr.tag not in SECTION_NAMES:
            raise StreamError(f"{where}: unknown section tag {hdr.tag!r} (corrupt stream?)")
        if flags & ~KNOWN_FLAGS or (flags and hdr.tag != RAM):
            raise StreamError(f"{where}: unknown section flags {flags:#x} (corrupt stream?)")
        if seq != self.seq:
            raise StreamError(f"{where}: sequence number is {seq} (corrupt or reordered stream)")
        if self.sealed and flags & FLAG_LIVE:
            raise StreamError(
                f"{hdr.describe()}: live page data outside the checksum, which a saved file "
                "must not have (written by an older vmferry, or corrupt)"
            )
        if length > MAX_PAYLOAD[hdr.tag]:
            raise StreamError(
                f"{hdr.describe()}: length {length} exceeds the limit "
                f"{MAX_PAYLOAD[hdr.tag]} (corrupt stream?)"
            )
        if hdr.tag not in self.grammar[self.last]:
            after = section_name(self.last) if self.last else "the stream header"
            raise StreamError(
                f"{hdr.describe()}: a {section_name(hdr.tag)} section cannot follow {after}"
            )
        self.seq += 1
        self.last = hdr.tag
        return hdr, xxhash.xxh3_64(bytes(raw[: SECTION_HEADER.size]))

    def read(self, hdr: SectionHeader, buf: memoryview) -> None:
        try:
            self.source.readinto(buf)
        except StreamError as e:
            raise StreamError(f"{hdr.describe()} is truncated: {e}") from e

    def read_payload(self, hdr: SectionHeader, h: xxhash.xxh3_64) -> bytes:
        """Read and check a small section's whole payload."""
        buf = bytearray(hdr.length)
        self.read(hdr, memoryview(buf))
        h.update(buf)
        self.check(hdr, h)
        return bytes(buf)

    @staticmethod
    def check(hdr: SectionHeader, h: xxhash.xxh3_64) -> None:
        if h.intdigest() != hdr.checksum:
            raise StreamError(f"{hdr.describe()}: checksum mismatch, the section is corrupt")
