"""migrate-recover on a destination in postcopy-paused: over tcp only (a file: URI is
refused in one line, nothing listens), and one at a time: a second while the first still
listens is refused in QEMU's words; once that try has ended a new one is taken."""

from __future__ import annotations

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


def test_a_second_recover_while_one_listens_is_refused_then_taken_once_it_ended(
    paused: tuple[IncomingMigration, FakePostcopy],
) -> None:
    inc, pc = paused
    inc.recover("tcp:127.0.0.1:0")
    first = inc.recover_port
    assert first and len(pc.acceptors) == 1
    with pytest.raises(MigrationError) as e:
        inc.recover("tcp:127.0.0.1:0")
    assert str(e.value) == (
        f"Migrate recovery is triggered already (listening on 127.0.0.1:{first} for the "
        "source's migrate resume)"
    )
    assert len(pc.acceptors) == 1 and inc.recover_port == first
    pc.acceptors[0].close()  # that try ended (await_recover closes its acceptor)
    inc.recover("tcp:127.0.0.1:0")
    assert len(pc.acceptors) == 2 and inc.recover_port != 0
