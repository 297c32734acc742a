"""The vmferry stream's mechanics: sections in sequence, checksummed, in a fixed grammar.

The byte layout is codec's. ``checksum`` is xxh3-64 over the first 24 header bytes and the
payload, so a flipped bit in a length or a tag is caught too. Only a live RAM section leaves
its page data out of it (FLAG_LIVE); a file never holds one, so every byte of a file is
checksummed. ``seq`` counts sections from 0: a dropped or repeated section is an error.
Sections come in a fixed grammar (``MAIN_GRAMMAR``); anything else is an error that names
the section, its number and its byte offset.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from vmferry.errors import StreamError
from vmferry.migration.codec import (
    ABRT,
    CEND,
    CHAN,
    CONF,
    CPUS,
    DEVD,
    DEVS,
    END,
    FLAG_LIVE,
    KNOWN_FLAGS,
    MAX_PAYLOAD,
    PCPY,
    RAM,
    ROUND,
    SECTION_HEADER,
    SECTION_HEADER_SIZE,
    SECTION_NAMES,
    STREAM_HEADER_SIZE,
    VRFY,
    check_stream_header,
    encode_stream_header,
    section_name,
)
from vmferry.migration.transport import Buffer, Sink, Source

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
    DEVS: frozenset({VRFY, PCPY, END, ABRT}),
    VRFY: frozenset({PCPY, END, ABRT}),
    PCPY: frozenset({END, ABRT}),  # post-copy: the owed pages come after the resume
    END: frozenset(),
    ABRT: frozenset(),
}
CHANNEL_GRAMMAR: dict[bytes | None, frozenset[bytes]] = {
    None: frozenset({CHAN}),
    CHAN: frozenset({RAM, CEND}),
    RAM: frozenset({RAM, CEND}),
    CEND: frozenset(),
}


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
        self._emit([encode_stream_header()])

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
        check_stream_header(raw)

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
                "must not have: the file is corrupt"
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
