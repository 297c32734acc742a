"""Post-copy's records on the main stream and its page channels: PCPY (the pages the
destination must not trust at the switch) and the hello that opens each page channel.
The page requests and runs themselves are postcopy.page_requests'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import numpy as np
import numpy.typing as npt

from vmferry.errors import StreamError
from vmferry.migration.codec.layout import (
    PCPY_HEAD,
    POSTCOPY_HELLO,
    POSTCOPY_MAGIC,
    ROLE_BACKGROUND,
    ROLE_RESUME,
    ROLE_URGENT,
)


@dataclass(frozen=True)
class OwedRecord:
    """PCPY: the pages the destination must not trust at the switch to post-copy (dirty
    since they were sent, or never sent), one bit a page in KVM's u64-word layout."""

    npages: int
    words: npt.NDArray[np.uint64]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, OwedRecord)
            and self.npages == other.npages
            and np.array_equal(self.words, other.words)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays: compared, never hashed

    def encode(self) -> list[bytes]:
        return [PCPY_HEAD.pack(self.npages), self.words.astype("<u8").tobytes()]

    @classmethod
    def decode(cls, payload: bytes, where: str, npages_ram: int) -> Self:
        if len(payload) < PCPY_HEAD.size:
            raise StreamError(f"{where}: {len(payload)} bytes is too short for its head")
        (npages,) = PCPY_HEAD.unpack_from(payload)
        if npages != npages_ram:
            raise StreamError(
                f"{where} is for a guest of {npages} pages, this one has {npages_ram}"
            )
        nwords = (npages + 63) // 64
        if len(payload) != PCPY_HEAD.size + 8 * nwords:
            raise StreamError(f"{where} has {len(payload)} bytes for a bitmap of {npages} pages")
        words = np.frombuffer(payload, dtype="<u8", offset=PCPY_HEAD.size).astype(np.uint64)
        if npages % 64 and int(words[-1]) >> (npages % 64):
            raise StreamError(f"{where} owes pages past the end of guest RAM ({npages})")
        return cls(npages, words)


@dataclass(frozen=True)
class PostcopyHello:
    """A post-copy page channel's first bytes: the migration it belongs to, its role."""

    mig_id: str
    role: int  # ROLE_URGENT | ROLE_BACKGROUND

    def encode(self) -> bytes:
        return POSTCOPY_HELLO.pack(POSTCOPY_MAGIC, self.role, self.mig_id.encode()[:32])

    @classmethod
    def decode(cls, raw: bytes | bytearray, where: str) -> Self:
        if len(raw) != POSTCOPY_HELLO.size:
            raise StreamError(f"{where}: {len(raw)} bytes, want {POSTCOPY_HELLO.size}")
        magic, role, mig_id = POSTCOPY_HELLO.unpack(raw)
        if magic != POSTCOPY_MAGIC:
            raise StreamError(f"{where}: magic {bytes(magic)!r}, want {POSTCOPY_MAGIC!r}")
        if role not in (ROLE_URGENT, ROLE_BACKGROUND, ROLE_RESUME):
            raise StreamError(f"{where}: role {role}, want {ROLE_URGENT}, {ROLE_BACKGROUND} or 3")
        try:
            text = bytes(mig_id).rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise StreamError(f"{where}: the migration id is not ASCII") from None
        return cls(text, role)


__all__ = ["OwedRecord", "PostcopyHello"]
