"""Post-copy's records on the main stream and the reply path: PCPY's owed bitmap, the
page channels' hello, the ``landed`` reply — each decoded strictly, one clear error."""

from __future__ import annotations

import numpy as np
import pytest

from vmferry.errors import MigrationError, StreamError
from vmferry.memory.dirty import DirtyBitmap
from vmferry.migration.codec import (
    ROLE_BACKGROUND,
    Landed,
    OwedRecord,
    PostcopyHello,
    decode_reply,
    encode_reply,
)

NPAGES = 1000  # not a multiple of 64: the last word has a tail


def _owed() -> OwedRecord:
    bm = DirtyBitmap(NPAGES)
    bm.set_runs(np.array([3, 500]), np.array([10, 500]))
    return OwedRecord(NPAGES, bm.words)


def test_the_owed_bitmap_round_trips() -> None:
    rec = _owed()
    assert OwedRecord.decode(b"".join(rec.encode()), "PCPY", NPAGES) == rec


@pytest.mark.parametrize(
    ("payload", "npages", "error"),
    [
        (b"\0" * 4, NPAGES, "too short for its head"),
        (None, NPAGES + 64, "is for a guest of 1000 pages, this one has 1064"),
        ("cut", NPAGES, "bytes for a bitmap of 1000 pages"),
        ("tail", NPAGES, "owes pages past the end of guest RAM"),
    ],
)
def test_a_bad_owed_record_is_refused_naming_what(
    payload: bytes | str | None, npages: int, error: str
) -> None:
    raw = b"".join(_owed().encode())
    if payload == "cut":
        raw = raw[:-8]
    elif payload == "tail":
        words = np.frombuffer(raw[8:], dtype="<u8").copy()
        words[-1] |= np.uint64(1 << 63)
        raw = raw[:8] + words.tobytes()
    elif isinstance(payload, bytes):
        raw = payload
    with pytest.raises(StreamError, match=error):
        OwedRecord.decode(raw, "PCPY", npages)


def test_a_hello_names_its_migration_and_role() -> None:
    hello = PostcopyHello("ab" * 16, ROLE_BACKGROUND)
    assert PostcopyHello.decode(hello.encode(), "channel") == hello
    raw = bytearray(hello.encode())
    with pytest.raises(StreamError, match="channel: magic"):
        PostcopyHello.decode(b"X" + bytes(raw[1:]), "channel")
    raw[8] = 7
    with pytest.raises(StreamError, match="channel: role 7, want 1, 2 or 3"):
        PostcopyHello.decode(raw, "channel")
    with pytest.raises(StreamError, match="44"):
        PostcopyHello.decode(bytes(10), "channel")


def test_landed_round_trips_and_refuses_a_bad_figure() -> None:
    msg = Landed(5, 2, 1.5, 0.1, 0.2, 0.3, (1.0, 2.5))
    assert decode_reply(encode_reply(msg).rstrip(b"\n")) == msg
    bad = encode_reply(Landed(5, 2, 1.5)).replace(b'"requests": 2', b'"requests": -2')
    with pytest.raises(MigrationError, match="'requests'"):
        decode_reply(bad.rstrip(b"\n"))
