"""JSON payloads, checked: every field's presence and type, and counts' ranges.

Any JSON the peer sends is loaded by ``load_json``: whatever the json module raises for it
(not JSON, not UTF-8, an integer of too many digits, nesting too deep) is a StreamError.
"""

from __future__ import annotations

import json
import math
from typing import Any

from vmferry.errors import StreamError


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def load_json(payload: bytes | bytearray, where: str) -> Any:
    """The JSON value of ``payload``; a StreamError naming ``where`` if it is none.

    ValueError covers JSONDecodeError, UnicodeDecodeError and an int past Python's digit
    limit; RecursionError, nesting deeper than the interpreter's stack."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise StreamError(f"{where} is not valid JSON: {str(e)[:200]}") from e


def load_object(payload: bytes | bytearray, where: str) -> dict[str, Any]:
    obj = load_json(payload, where)
    if not isinstance(obj, dict):
        raise StreamError(f"{where}: the payload is {type(obj).__name__}, want an object")
    return obj


def is_a(value: Any, kind: type | tuple[type, ...]) -> bool:
    # JSON true is no number of pages.
    return isinstance(value, kind) and not (isinstance(value, bool) and bool not in _types(kind))


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise StreamError(f"{where}: field {key!r} is missing")
    value = obj[key]
    if not is_a(value, kind):
        want = " or ".join("null" if t is type(None) else t.__name__ for t in _types(kind))
        raise StreamError(f"{where}: field {key!r} is {_short(value)}, want {want}")
    return value


def count(obj: dict[str, Any], key: str, where: str, lo: int = 0, hi: int = 1 << 63) -> int:
    n: int = get(obj, key, int, where)
    if not lo <= n <= hi:
        raise StreamError(f"{where}: field {key!r} is {_short(n)}, want {lo}..{hi}")
    return n


def figure(obj: dict[str, Any], key: str, where: str) -> float:
    """A measured quantity (milliseconds): a finite number, not negative."""
    x = get(obj, key, (int, float), where)
    if not (math.isfinite(x) and x >= 0):
        raise StreamError(f"{where}: field {key!r} is {x!r}, want a finite number >= 0")
    return float(x)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
