"""The in-memory link (``socket_link``): connections made in kernel memory, accepted in
order, bounded waits, a close that wakes a waiting accept, the liveness bounds."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from vmferry.errors import MigrationError
from vmferry.migration.liveness import bound_socket, receive_timeout
from vmferry.testing.transport import LinkAcceptor, socket_link

# Paced (≈ 3 s), so that it is migrated while it runs, then ends on the destination.
MEMTOUCH = "wss=4M pattern=random seed=5 rounds=48 rate=64"


def test_a_connection_is_a_connected_local_socket_pair() -> None:
    connector, acceptor = socket_link()
    a = connector.connect(0, 1.0)
    b = acceptor.accept(1.0, "source")
    try:
        assert a.family == b.family == socket.AF_UNIX
        assert acceptor.port == 0
        a.sendall(b"VMFERRY")
        assert b.recv(7) == b"VMFERRY"
        b.sendall(b'{"kind": "alive"}\n')
        assert a.recv(64) == b'{"kind": "alive"}\n'
    finally:
        a.close()
        b.close()
        acceptor.close()


def test_connections_are_accepted_in_the_order_they_were_made() -> None:
    connector, acceptor = socket_link()
    ends = [connector.connect(i, 1.0) for i in range(3)]
    for i, end in enumerate(ends):
        end.sendall(bytes([i]))
    accepted = [acceptor.accept(1.0, f"channel {i}") for i in range(3)]
    try:
        assert [s.recv(1) for s in accepted] == [b"\0", b"\1", b"\2"]
        assert isinstance(acceptor, LinkAcceptor) and acceptor.connections == 3
    finally:
        for s in ends + accepted:
            s.close()
        acceptor.close()


def test_an_accept_that_waits_too_long_names_what_it_waited_for() -> None:
    _, acceptor = socket_link()
    t0 = time.monotonic()
    with pytest.raises(MigrationError, match=r"^no channel 1 connected within 0 s$"):
        acceptor.accept(0.2, "channel 1")
    assert time.monotonic() - t0 >= 0.2
    acceptor.close()


def test_closing_wakes_a_waiting_accept_and_refuses_new_connections() -> None:
    connector, acceptor = socket_link()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            acceptor.accept(None, "source")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)
    acceptor.close()
    t.join(5)
    assert not t.is_alive(), "close did not wake the accept"
    assert len(errors) == 1 and isinstance(errors[0], OSError), errors
    with pytest.raises(MigrationError, match="no longer accepts connections"):
        connector.connect(0, 1.0)
    acceptor.close()  # twice is fine


def test_a_connection_never_accepted_ends_for_its_source() -> None:
    connector, acceptor = socket_link()
    a = connector.connect(0, 1.0)
    acceptor.close()
    try:
        a.settimeout(5)
        assert a.recv(1) == b""
    finally:
        a.close()


def test_the_liveness_bounds_apply_to_a_link_socket() -> None:
    """Only TCP has TCP_USER_TIMEOUT and keepalive; the send and receive bounds stay."""
    connector, acceptor = socket_link()
    a = connector.connect(0, 1.0)
    b = acceptor.accept(1.0, "source")
    try:
        bound_socket(a, 0.3)
        receive_timeout(b, 0.3)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # SO_RCVTIMEO: nothing within the bound
    finally:
        a.close()
        b.close()
        acceptor.close()
