"""The host switch driven directly: datagrams in through ``handle``, datagrams out
recorded, the interleaving of its two threads chosen by the test (no timing luck)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from types import TracebackType

import pytest

from vmferry.devices.nic import wire
from vmferry.devices.nic.host import PfConfig
from vmferry.devices.nic.switch import HostSwitch
from vmferry.devices.nic.wire import Addr

VM = bytes.fromhex("02aa00000001")
PEER = bytes.fromhex("02bb00000002")
PEER_ADDR: Addr = ("127.0.0.1", 9)  # never sent to: every send is recorded instead


def frame(dst: bytes, src: bytes, n: int) -> bytes:
    return dst + src + b"\x88\xb5" + n.to_bytes(4, "little") + bytes(60)


class Recorded(HostSwitch):
    """A switch whose sends are recorded, not put on the wire."""

    def __init__(self, name: str, pf: PfConfig) -> None:
        super().__init__(name, pf)
        self.sent: list[tuple[wire.Datagram, Addr]] = []

    def _sendto(self, data: bytes, addr: Addr) -> None:
        self.sent.append((wire.decode(data), addr))


class StepLock:
    """The switch's lock; ``after_next_release`` runs once, right after the next
    critical section ends: another thread's work slipped in at exactly that point."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.after_next_release: Callable[[], None] | None = None

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()
        step, self.after_next_release = self.after_next_release, None
        if step is not None:
            step()


@pytest.fixture
def switches() -> Iterator[tuple[Recorded, Recorded]]:
    """Host a (the VM's old host) and host b (its new one), each the other's neighbour."""
    a = Recorded("a", PfConfig(uplink="127.0.0.1:0"))
    b = Recorded("b", PfConfig(uplink="127.0.0.1:0"))
    a.neighbours, b.neighbours = [b.address], [a.address]
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def copies_reaching_the_peer(a: Recorded, b: Recorded, n: int) -> int:
    """Deliver what b sent to a, as the uplink would; count echo ``n`` arriving at the
    peer from either switch."""
    for dgram, addr in list(b.sent):
        if addr == a.address:
            a.handle(wire.encode(dgram.kind, dgram.frame, hops=dgram.hops), b.address)
    return sum(
        1
        for sw in (a, b)
        for dgram, addr in sw.sent
        if addr == PEER_ADDR and dgram.frame == frame(PEER, VM, n)
    )


def test_an_echo_flooded_while_the_peer_is_learned_reaches_it_once(
    switches: tuple[Recorded, Recorded],
) -> None:
    """The VM has just moved to b and echoes a frame it got on a; b has not learned the
    peer yet, so it floods the echo to a, which relays it to the peer. If b learns the
    peer (a's hand-over of a buffered frame) between its lookup and its flood, the flood
    must not go to the peer as well."""
    a, b = switches
    a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 0)), PEER_ADDR)  # a knows the peer
    port = b.attach(VM, 0, lambda: None)
    lock = StepLock()
    b._lock = lock  # type: ignore[assignment]
    handed_over = wire.encode(wire.KIND_FORWARD, frame(VM, PEER, 1), origin=PEER_ADDR)
    lock.after_next_release = lambda: b.handle(handed_over, a.address)
    b.transmit(port, frame(PEER, VM, 0))
    assert lock.after_next_release is None, "the hand-over did not slip in"
    assert b.take(port, 8) == [frame(VM, PEER, 1)]
    assert copies_reaching_the_peer(a, b, 0) == 1


def test_an_echo_flooded_before_the_peer_is_known_is_relayed_once(
    switches: tuple[Recorded, Recorded],
) -> None:
    """The control: without the interleaving the flood goes to a, which relays it."""
    a, b = switches
    a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 0)), PEER_ADDR)
    port = b.attach(VM, 0, lambda: None)
    b.transmit(port, frame(PEER, VM, 0))
    assert [addr for _, addr in b.sent] == [a.address]
    assert copies_reaching_the_peer(a, b, 0) == 1


def test_once_the_peer_is_known_the_echo_goes_straight_to_it(
    switches: tuple[Recorded, Recorded],
) -> None:
    a, b = switches
    b.handle(wire.encode(wire.KIND_FORWARD, frame(VM, PEER, 1), origin=PEER_ADDR), a.address)
    port = b.attach(VM, 0, lambda: None)
    b.transmit(port, frame(PEER, VM, 0))
    assert [addr for _, addr in b.sent] == [PEER_ADDR]
    assert copies_reaching_the_peer(a, b, 0) == 1
