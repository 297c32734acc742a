"""Post-copy's wire records: page requests (destination → source) and page runs back.

QEMU asks for pages on the return path as (RAMBlock name, offset, length); vmferry has one
RAM space (memfd offsets), so a request is (ram_offset, npages). Pages come back as runs:
a fixed header, then exactly ``npages`` pages of data. A run answers a request (URGENT) or
is part of the background push (BACKGROUND); END closes the push and says how many pages
the source sent in all, so the destination knows when nothing more is owed.

Decoding is strict: whatever the peer sends is checked against guest RAM before it is
used, and anything wrong is one ``PageRequestError`` or ``PageReplyError`` naming the
record and the field. Pure functions and struct layouts; no I/O here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vmferry.errors import StreamError
from vmferry.memory.guest_memory import PAGE_SIZE

# A run's data lands with one UFFDIO_COPY: 64 KiB keeps a vCPU's fault from waiting long
# behind a background COPY (the probe's p99 stayed low at this size).
MAX_RUN_PAGES = 16
# A request is a few pages around a fault or one DMA's span; 2 MiB bounds a peer's ask.
MAX_REQUEST_PAGES = 512

REQUEST_MAGIC = b"PgRq"
RUN_MAGIC = b"PgRn"
REQUEST = struct.Struct("<4sQI")  # magic, ram_offset, npages
RUN = struct.Struct("<4sQII")  # magic, ram_offset, npages (END: pages sent), kind


class PageRequestError(StreamError):
    """A page request that cannot be served: malformed, misaligned or outside guest RAM."""


class PageReplyError(StreamError):
    """A page run from the source that cannot be landed: malformed or outside guest RAM."""


class RunKind(enum.IntEnum):
    URGENT = 1  # answers a request: a vCPU or a DMA waits on it
    BACKGROUND = 2  # the push of every page not yet sent
    END = 3  # nothing follows; ``npages`` is how many pages were sent in all


@dataclass(frozen=True)
class PageRequest:
    ram_offset: int
    npages: int

    @property
    def first_page(self) -> int:
        return self.ram_offset // PAGE_SIZE


@dataclass(frozen=True)
class PageRun:
    ram_offset: int
    npages: int
    kind: RunKind

    @property
    def first_page(self) -> int:
        return self.ram_offset // PAGE_SIZE

    @property
    def data_bytes(self) -> int:
        """Bytes of page data after the header (none after END)."""
        return 0 if self.kind is RunKind.END else self.npages * PAGE_SIZE


def _span_error(ram_offset: int, npages: int, ram_size: int, limit: int) -> str | None:
    """Why (ram_offset, npages) is no span of guest RAM, or None if it is one."""
    if ram_offset % PAGE_SIZE:
        return f"RAM offset {ram_offset:#x} is not page aligned"
    if not 1 <= npages <= limit:
        return f"{npages} pages at {ram_offset:#x}: want 1..{limit}"
    if ram_offset + npages * PAGE_SIZE > ram_size:
        return (
            f"RAM {ram_offset:#x}+{npages * PAGE_SIZE:#x} is outside guest RAM (0x0-{ram_size:#x})"
        )
    return None


def encode_request(req: PageRequest) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, req.ram_offset, req.npages)


def decode_request(raw: bytes | bytearray | memoryview, ram_size: int) -> PageRequest:
    """The request in ``raw`` (REQUEST.size bytes), checked against guest RAM."""
    if len(raw) != REQUEST.size:
        raise PageRequestError(f"page request is {len(raw)} bytes, want {REQUEST.size}")
    magic, ram_offset, npages = REQUEST.unpack(raw)
    if magic != REQUEST_MAGIC:
        raise PageRequestError(f"page request has magic {magic!r}, want {REQUEST_MAGIC!r}")
    why = _span_error(ram_offset, npages, ram_size, MAX_REQUEST_PAGES)
    if why:
        raise PageRequestError(f"page request refused: {why}")
    return PageRequest(ram_offset, npages)


def encode_run(run: PageRun) -> bytes:
    return RUN.pack(RUN_MAGIC, run.ram_offset, run.npages, int(run.kind))


def decode_run(raw: bytes | bytearray | memoryview, ram_size: int) -> PageRun:
    """The run header in ``raw`` (RUN.size bytes), checked against guest RAM."""
    if len(raw) != RUN.size:
        raise PageReplyError(f"page run header is {len(raw)} bytes, want {RUN.size}")
    magic, ram_offset, npages, kind = RUN.unpack(raw)
    if magic != RUN_MAGIC:
        raise PageReplyError(f"page run has magic {magic!r}, want {RUN_MAGIC!r}")
    if kind not in RunKind._value2member_map_:
        raise PageReplyError(f"page run at {ram_offset:#x} has kind {kind}, want 1, 2 or 3")
    if kind == RunKind.END:
        if ram_offset != 0 or npages > ram_size // PAGE_SIZE:
            raise PageReplyError(
                f"end of pages: offset {ram_offset:#x} and {npages} pages sent, want offset "
                f"0 and at most {ram_size // PAGE_SIZE} pages"
            )
        return PageRun(0, npages, RunKind.END)
    why = _span_error(ram_offset, npages, ram_size, MAX_RUN_PAGES)
    if why:
        raise PageReplyError(f"page run refused: {why}")
    return PageRun(ram_offset, npages, RunKind(kind))
