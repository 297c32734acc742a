"""The reply path's lines and the binary bodies after them (the audit's chunks), read by
one helper: whole across partial sends, a peer silent or gone said in words."""

from __future__ import annotations

import socket
import threading

import pytest

from vmferry.errors import MigrationError
from vmferry.migration.channel import PeerClosed, PeerSilent, ReplyPath
from vmferry.migration.codec import Alive, Audit


def test_a_line_and_its_body_arrive_whole_across_partial_sends() -> None:
    a, b = socket.socketpair()
    with a, b:
        out, into = ReplyPath(a), ReplyPath(b, "the source")
        body = bytes(range(256)) * 500  # 125 KiB

        def send() -> None:
            out.send_with(Audit(len(body)), body)  # more than the socket buffers: partial
            out.send(Alive())

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        msg = into.receive(2.0, "the audit")
        assert msg == Audit(len(body))
        assert into.receive_body(len(body), 2.0, "an audit chunk") == body
        assert into.receive(2.0, "a heartbeat") == Alive()
        sender.join(2)


def test_silence_a_closed_peer_and_an_oversized_line_are_errors_in_words() -> None:
    a, b = socket.socketpair()
    with a, b:
        into = ReplyPath(b, "the source")
        with pytest.raises(PeerSilent, match="no the audit from the source within 0 s"):
            into.receive(0.05, "the audit")
        a.sendall(b"abc")
        with pytest.raises(PeerSilent):
            into.receive_body(10, 0.05, "an audit chunk")
        sender = threading.Thread(target=a.sendall, args=(b"x" * (1 << 17),), daemon=True)
        sender.start()
        with pytest.raises(MigrationError, match="oversized reply"):
            into.receive(2.0, "a heartbeat")
        b.recv(1 << 18)  # let the sender finish
        sender.join(2)
    a, b = socket.socketpair()
    with b:
        into = ReplyPath(b, "the source")
        a.sendall(b"1234")
        a.close()
        with pytest.raises(PeerClosed, match="the source closed the connection in an audit chunk"):
            into.receive_body(10, 2.0, "an audit chunk")
        with pytest.raises(PeerClosed, match="closed the connection before the verdict"):
            into.receive(2.0, "the verdict")
