"""Framing and the session, without sockets: bytes in, reply bytes out."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from tests.qmp.fakes import FakeVm
from vmferry.qmp.framing import JsonSplitter, Oversized, decode, encode
from vmferry.qmp.protocol import QmpSession, event_message


def split(*chunks: bytes, max_message: int = 1 << 20) -> list[bytes | Oversized]:
    splitter = JsonSplitter(max_message)
    return [text for chunk in chunks for text in splitter.feed(chunk)]


def test_split_by_value_not_by_line() -> None:
    assert split(b'{"a": 1}{"b": [2, {"c": 3}]}\n  ') == [b'{"a": 1}', b'{"b": [2, {"c": 3}]}']
    assert split(b'{"a":', b"\n 1", b"}") == [b'{"a":\n 1}']


def test_braces_inside_strings_do_not_count() -> None:
    assert split(b'{"s": "}{\\"]"}') == [b'{"s": "}{\\"]"}']


def test_top_level_scalars_and_strays() -> None:
    assert split(b'42 "x{" true\n}\n') == [b"42", b'"x{"', b"true", b"}"]
    assert split(b"7{}") == [b"7", b"{}"]


def test_oversized_message_is_dropped_up_to_the_newline() -> None:
    texts = split(b'{"a": "' + b"x" * 100 + b'"} trailing\n{"ok": 1}', max_message=64)
    assert isinstance(texts[0], Oversized)
    assert texts[1:] == [b'{"ok": 1}']


@pytest.mark.parametrize(
    "text", [b"{", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff", b"[" * 100_000 + b"]" * 100_000]
)
def test_decode_refuses(text: bytes) -> None:
    with pytest.raises(ValueError):
        decode(text)


def test_encode_is_one_line() -> None:
    assert encode({"return": {}}) == b'{"return": {}}\n'


def test_event_timestamp_split() -> None:
    message = json.loads(event_message("STOP", None, now=12.25))
    assert message == {"event": "STOP", "timestamp": {"seconds": 12, "microseconds": 250000}}


def session_replies(session: QmpSession, data: bytes) -> list[dict[str, Any]]:
    return [json.loads(reply) for reply in session.feed(data)]


def test_session_negotiates_then_dispatches() -> None:
    vm = FakeVm()
    session = QmpSession(vm, threading.Lock())
    assert session_replies(session, b'{"execute": "stop"}') == [
        {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            }
        }
    ]
    assert not session.negotiated
    replies = session_replies(
        session, b'{"execute": "qmp_capabilities", "arguments": {}}{"execute": "stop", "id": 1}'
    )
    assert replies == [{"return": {}}, {"return": {}, "id": 1}]
    assert session.negotiated
    assert vm.running is False


def test_session_replies_are_produced_one_at_a_time() -> None:
    vm = FakeVm()
    session = QmpSession(vm, threading.Lock())
    replies = session.feed(b'{"execute": "qmp_capabilities"}{"execute": "stop"}')
    assert next(replies) == b'{"return": {}}\n'
    assert vm.calls == []  # stop has not run before its turn
    assert next(replies) == b'{"return": {}}\n'
    assert vm.calls == [("stop", {})]


def test_session_oversized_request() -> None:
    session = QmpSession(FakeVm(), threading.Lock())
    (reply,) = session_replies(session, b"[" + b"0," * (1 << 20) + b"0]\n")
    assert reply == {
        "error": {"class": "GenericError", "desc": "JSON parse error, message too large"}
    }
