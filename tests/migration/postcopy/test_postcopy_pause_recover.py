"""migrate-recover on a destination in postcopy-paused: over tcp only (a file: URI is
refused in one line, nothing listens), and one at a time: a second while the first still
listens replaces it (the first's port closed: the source may have given up a try this side
still waits in, and the new one must not queue behind it)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from vmferry.errors import MigrationError
from vmferry.migration.channel import parse_uri
from vmferry.migration.connector import TcpAcceptor
from vmferry.migration.destination import IncomingMigration
from vmferry.migration.receiver_events import ReceiverState


class FakePostcopy:
    def __init__(self) -> None:
        self.acceptors: list[TcpAcceptor] = []

    def recover_with(self, acceptor: TcpAcceptor) -> None:
        self.acceptors.append(acceptor)


@pytest.fixture
def paused() -> Iterator[tuple[IncomingMigration, FakePostcopy]]:
    inc = IncomingMigration(parse_uri("tcp:127.0.0.1:0"))
    pc = FakePostcopy()
    walk = SimpleNamespace(state=ReceiverState.POSTCOPY_PAUSED)
    inc._reception = SimpleNamespace(postcopy=pc, walk=walk)  # type: ignore[assignment]
    yield inc, pc
    for a in pc.acceptors:
        a.close()
    inc.close()


def test_a_file_uri_is_refused_and_nothing_listens(
    paused: tuple[IncomingMigration, FakePostcopy],
) -> None:
    inc, pc = paused
    with pytest.raises(MigrationError) as e:
        inc.recover("file:/tmp/x")
    assert str(e.value) == "post-copy recovers over tcp:HOST:PORT only, not 'file:/tmp/x'"
    assert pc.acceptors == [] and inc.recover_port == 0


def test_a_second_recover_while_one_listens_replaces_it(
    paused: tuple[IncomingMigration, FakePostcopy],
) -> None:
    inc, pc = paused
    inc.recover("tcp:127.0.0.1:0")
    first = inc.recover_port
    assert first and len(pc.acceptors) == 1
    inc.recover("tcp:127.0.0.1:0")
    assert len(pc.acceptors) == 2 and inc.recover_port not in (0, first)
    assert pc.acceptors[0].listener.fileno() == -1, "the first still listens"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first), timeout=2).close()
    # Its waiting accept (the receiving thread's) fails at once: that try ends.
    with pytest.raises((OSError, MigrationError)):
        pc.acceptors[0].accept(1, "the source's resume")
    socket.create_connection(("127.0.0.1", inc.recover_port), timeout=2).close()
    pc.acceptors[1].close()  # that try ended (await_recover closes its acceptor)
    inc.recover("tcp:127.0.0.1:0")
    assert len(pc.acceptors) == 3
