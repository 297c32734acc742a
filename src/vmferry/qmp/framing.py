"""Splitting a QMP byte stream into JSON texts, and turning messages into bytes. No I/O.

QEMU's parser ends a message where its top-level value ends, not at a newline, so a
client may send several per line or one over several lines; this does the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

#: Bigger than any QMP request vmferry understands; stops a client from growing the buffer.
MAX_MESSAGE = 1 << 20

_OPEN = b"{["
_CLOSE = b"}]"
_SPACE = b" \t\r\n"


class Oversized:
    """Stands in the stream for a message longer than `MAX_MESSAGE`, which was dropped."""


class JsonSplitter:
    """Feed bytes, get back each complete top-level JSON text (still undecoded)."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._max = max_message
        self._buf = bytearray()
        self._depth = 0
        self._scalar = False  # a top-level value that is not an object or array
        self._in_string = False
        self._escaped = False
        self._discarding = False  # after an oversized message, until the next newline

    def feed(self, data: bytes) -> Iterator[bytes | Oversized]:
        for byte in data:
            if self._discarding:
                self._discarding = byte != ord("\n")
                continue
            if self._depth == 0 and not self._scalar:
                if byte in _SPACE:
                    continue
                self._start(byte)
            elif self._scalar and not self._in_string and (byte in _SPACE or byte in _OPEN):
                # A bare scalar ends at the next space or structure; hand it over and
                # start again with this byte.
                yield self._take()
                if byte in _OPEN:
                    self._start(byte)
                continue
            else:
                self._buf.append(byte)
                self._track(byte)
            if len(self._buf) > self._max:
                self._reset()
                self._discarding = byte != ord("\n")
                yield Oversized()
            elif self._complete():
                yield self._take()

    def _start(self, byte: int) -> None:
        self._buf.append(byte)
        if byte in _OPEN:
            self._depth = 1
        else:
            self._scalar = True
            self._in_string = byte == ord('"')

    def _track(self, byte: int) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif byte == ord("\\"):
                self._escaped = True
            elif byte == ord('"'):
                self._in_string = False
        elif byte == ord('"'):
            self._in_string = True
        elif not self._scalar and byte in _OPEN:
            self._depth += 1
        elif not self._scalar and byte in _CLOSE:
            self._depth -= 1

    def _complete(self) -> bool:
        if self._scalar:
            # A top-level string is complete once its closing quote is seen.
            return self._buf[:1] == b'"' and len(self._buf) > 1 and not self._in_string
        return self._depth == 0 and bool(self._buf)

    def _take(self) -> bytes:
        text = bytes(self._buf)
        self._reset()
        return text

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._scalar = self._in_string = self._escaped = False


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid literal '{name}'")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def decode(text: bytes) -> Any:
    """One JSON text as a Python value; ValueError says what is wrong with it."""
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("nesting too deep") from None


def encode(message: Any) -> bytes:
    """One message as QEMU writes it: a JSON object and a newline."""
    return json.dumps(message).encode() + b"\n"
