"""The host switch driven directly: datagrams in through ``handle``, datagrams out
recorded, the interleaving of its two threads chosen by the test (no timing luck)."""

from __future__ import annotations

import socket
import threading
import time
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


# ---- x-verify-hold-output: the destination's transmit waits for the audit


def out_to(sw: Recorded, addr: Addr) -> list[bytes]:
    return [d.frame for d, a in sw.sent if a == addr and d.kind == wire.KIND_DATA]


def held_switch(bound: int = 4096) -> Recorded:
    sw = Recorded("b", PfConfig(uplink="127.0.0.1:0", buffer=bound))
    sw.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 0)), PEER_ADDR)  # knows the peer
    return sw


def test_held_output_goes_out_once_in_order_when_released() -> None:
    b = held_switch()
    try:
        port = b.attach(VM, 0, lambda: None)
        b.hold(port)
        for n in range(3):
            b.transmit(port, frame(PEER, VM, n))
        assert out_to(b, PEER_ADDR) == [], "a held frame went out"
        figures = b.release(port)
        assert out_to(b, PEER_ADDR) == [frame(PEER, VM, n) for n in range(3)]
        assert figures == {"held": 3, "released": 3, "dropped": 0, "overflow": 0}
        b.transmit(port, frame(PEER, VM, 3))  # not held any more
        assert out_to(b, PEER_ADDR)[-1] == frame(PEER, VM, 3) and port.hold is None
        assert b.release(port)["released"] == 0  # a second release has nothing to send
    finally:
        b.close()


def test_a_frame_sent_while_the_hold_drains_does_not_overtake_it() -> None:
    b = held_switch()
    try:
        port = b.attach(VM, 0, lambda: None)
        b.hold(port)
        for n in range(2):
            b.transmit(port, frame(PEER, VM, n))
        lock = StepLock()
        b._lock = lock  # type: ignore[assignment]
        # The VF's engine transmits right after the release took the first held frame.
        lock.after_next_release = lambda: b.transmit(port, frame(PEER, VM, 2))
        assert b.release(port)["released"] == 3
        assert lock.after_next_release is None, "the transmit did not slip in"
        assert out_to(b, PEER_ADDR) == [frame(PEER, VM, n) for n in range(3)]
    finally:
        b.close()


def test_a_hold_over_its_bound_drops_the_oldest_and_counts_them() -> None:
    b = held_switch(bound=3)
    try:
        port = b.attach(VM, 0, lambda: None)
        b.hold(port)
        for n in range(5):
            b.transmit(port, frame(PEER, VM, n))
        figures = b.release(port)
        assert out_to(b, PEER_ADDR) == [frame(PEER, VM, n) for n in (2, 3, 4)]
        assert figures == {"held": 5, "released": 3, "dropped": 0, "overflow": 2}
    finally:
        b.close()


def test_a_dropped_hold_sends_nothing_then_or_later() -> None:
    b = held_switch()
    try:
        port = b.attach(VM, 0, lambda: None)
        b.hold(port)
        b.transmit(port, frame(PEER, VM, 0))
        b.transmit(port, frame(PEER, VM, 1))
        assert b.drop(port) == {"held": 2, "released": 0, "dropped": 2, "overflow": 0}
        b.transmit(port, frame(PEER, VM, 2))  # TX drained after the drop: dropped too
        assert b.release(port)["dropped"] == 3  # a release after a drop sends nothing
        b.transmit(port, frame(PEER, VM, 3))  # nor does it end the drop
        assert out_to(b, PEER_ADDR) == [] and b.drop(port)["dropped"] == 4
    finally:
        b.close()


def test_frames_for_a_port_whose_output_is_held_still_reach_it() -> None:
    b = held_switch()
    try:
        port = b.attach(VM, 0, lambda: None)
        b.hold(port)
        b.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 5)), PEER_ADDR)
        assert b.take(port, 8) == [frame(VM, PEER, 5)]
    finally:
        b.close()


# ---- the MAC moves back: a rollback after the destination announced


def deliver(src: Recorded, dst: Recorded, start: int = 0) -> int:
    """Hand ``dst`` what ``src`` sent it from ``src.sent[start:]``, as the uplink would;
    returns where to start next time."""
    sent = list(src.sent)
    for dgram, addr in sent[start:]:
        if addr == dst.address:
            dst.handle(
                wire.encode(dgram.kind, dgram.frame, hops=dgram.hops, origin=dgram.origin),
                src.address,
            )
    return len(sent)


def announces(sw: Recorded, addr: Addr) -> int:
    """The announces ``sw`` sent to ``addr`` of its own (not ones it flooded on)."""
    return sum(
        1
        for d, a in sw.sent
        if a == addr and d.kind == wire.KIND_ANNOUNCE and d.origin == sw.address
    )


def test_a_rollback_after_the_announce_moves_the_mac_back_to_the_source(
    switches: tuple[Recorded, Recorded],
) -> None:
    a, b = switches
    src = a.attach(VM, 0, lambda: None)
    a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 0)), PEER_ADDR)
    assert a.take(src, 8) == [frame(VM, PEER, 0)]
    a.stand_down(src)  # the switchover: the source's VF stops
    dst = b.attach(VM, 0, lambda: None)
    b.reclaim(dst)  # the destination's VF runs
    b.announce(dst, delays=(0.0,)).join()
    from_b = deliver(b, a)
    assert src.moved_to == b.address
    a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 1)), PEER_ADDR)  # forwarded to b
    mark = deliver(a, b)
    assert b.take(dst, 8) == [frame(VM, PEER, 1)]
    # The audit fails: the destination's VF stops, then the source's runs again.
    b.stand_down(dst)
    b.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 2)), PEER_ADDR)  # waits in b's port
    assert a.reclaim(src), "the source's port had moved: it must announce"
    a.announce(src, delays=(0.0,)).join()
    assert announces(a, PEER_ADDR) == 1 and announces(a, b.address) == 1
    mark = deliver(a, b, mark)
    assert dst.moved_to == a.address
    from_b = deliver(b, a, from_b)  # b hands back what waited in its port
    a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 3)), PEER_ADDR)
    b.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 4)), PEER_ADDR)  # a late one at b
    deliver(b, a, from_b)
    got = a.take(src, 8)
    assert sorted(got) == sorted(frame(VM, PEER, n) for n in (2, 3, 4)), "each once, at a"
    assert b.take(dst, 8) == []


def test_a_stale_announce_from_the_rolled_back_destination_is_answered_not_obeyed(
    switches: tuple[Recorded, Recorded],
) -> None:
    """A repeat of the destination's announce that crossed the source's on the wire must
    not take the MAC from the source that runs the VM again (the two ports would then
    forward to each other)."""
    a, b = switches
    src = a.attach(VM, 0, lambda: None)
    a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 0)), PEER_ADDR)
    stale = wire.encode(wire.KIND_ANNOUNCE, wire.rarp_frame(VM), origin=b.address)
    a.handle(stale, b.address)
    assert src.moved_to is None and src.stale_announces == 1
    deadline = threading.Event()
    for _ in range(200):  # the answer goes from a timer thread
        if announces(a, PEER_ADDR):
            break
        deadline.wait(0.01)
    assert announces(a, PEER_ADDR) == 1 and announces(a, b.address) == 1
    a.handle(stale, b.address)  # within DEFEND_INTERVAL_S: ignored, not answered again
    assert src.stale_announces == 2 and src.moved_to is None
    assert announces(a, PEER_ADDR) == 1


def test_announce_repeats_end_when_the_vf_stops(switches: tuple[Recorded, Recorded]) -> None:
    a, b = switches
    dst = b.attach(VM, 0, lambda: None)
    first = threading.Event()
    real = b._sendto

    def sendto(data: bytes, addr: Addr) -> None:
        real(data, addr)
        first.set()

    b._sendto = sendto  # type: ignore[method-assign]
    thread = b.announce(dst, delays=(0.0, 0.3, 0.6))
    assert first.wait(2), "the first announce did not go out"
    b.stand_down(dst)  # the audit failed: the destination's VF stopped
    thread.join(2)
    assert not thread.is_alive() and announces(b, a.address) == 1


# ---- the old host after the move: nothing it still receives for the MAC is lost

B_ADDR: Addr = ("127.0.0.1", 10)  # the new host's uplink (recorded, never sent to)


def moved_away(a: Recorded) -> None:
    """a's VF stopped at the switchover and b's announce came: the MAC lives at b."""
    src = a.attach(VM, 0, lambda: None)
    a.stand_down(src)
    a.handle(wire.encode(wire.KIND_ANNOUNCE, wire.rarp_frame(VM), origin=B_ADDR), B_ADDR)
    assert src.moved_to == B_ADDR


def told(sw: Recorded, addr: Addr) -> int:
    """Announces ``sw`` sent ``addr`` saying the VM lives at b."""
    return sum(
        1 for d, a in sw.sent if a == addr and d.kind == wire.KIND_ANNOUNCE and d.origin == B_ADDR
    )


def test_a_sender_that_missed_the_move_is_told_once_where_the_mac_went() -> None:
    """The flood at the move reaches the senders known then. One that starts sending
    after it (or whose copy was lost) is forwarded for, but must also learn the move
    from the old host, which goes away with the source process."""
    a = Recorded("a", PfConfig(uplink="127.0.0.1:0"))
    try:
        moved_away(a)
        assert told(a, PEER_ADDR) == 0  # it did not know the peer then
        for n in range(3):
            a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, n)), PEER_ADDR)
        forwarded = [d.frame for d, addr in a.sent if addr == B_ADDR]
        assert forwarded == [frame(VM, PEER, n) for n in range(3)]
        assert told(a, PEER_ADDR) == 1, "the peer was not told, or told at every frame"
        redirect = next(d for d, addr in a.sent if addr == PEER_ADDR)
        assert redirect.hops == 1 and wire.src_mac(redirect.frame) == VM
    finally:
        a.close()


def test_a_sender_that_heard_the_flood_is_not_told_again() -> None:
    a = Recorded("a", PfConfig(uplink="127.0.0.1:0"))
    try:
        a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 0)), PEER_ADDR)  # known
        moved_away(a)
        assert told(a, PEER_ADDR) == 1  # the flood
        a.handle(wire.encode(wire.KIND_DATA, frame(VM, PEER, 1)), PEER_ADDR)  # in flight
        assert told(a, PEER_ADDR) == 1
    finally:
        a.close()


def test_a_switch_that_goes_away_first_forwards_what_waits_for_a_moved_mac() -> None:
    """The source's process ends after the audit; its switch ends with it. Frames for the
    moved MAC still waiting in its socket (its uplink thread starved on a loaded host:
    CI saw 5 lost) are forwarded first, not dropped with the socket."""
    a = Recorded("a", PfConfig(uplink="127.0.0.1:0"))
    moved_away(a)
    starved = threading.Event()
    handle = a.handle

    def slow_handle(data: bytes, addr: Addr) -> None:
        starved.wait(5)
        handle(data, addr)

    a.handle = slow_handle  # type: ignore[method-assign]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        for n in range(20):
            peer.sendto(wire.encode(wire.KIND_DATA, frame(VM, PEER, n)), a.address)
        closing = threading.Thread(target=a.close)
        closing.start()  # the process ends ...
        time.sleep(0.05)
        starved.set()  # ... and the uplink thread gets the CPU back
        closing.join(10)
    forwarded = [d.frame for d, addr in a.sent if addr == B_ADDR and d.kind == wire.KIND_FORWARD]
    assert forwarded == [frame(VM, PEER, n) for n in range(20)]


def test_a_switch_that_owes_nothing_goes_away_at_once() -> None:
    a = Recorded("a", PfConfig(uplink="127.0.0.1:0"))
    a.attach(VM, 0, lambda: None)
    t0 = time.monotonic()
    # A switch that owed something would wait out the whole quiet period (5 s here):
    # returning well before it says nothing was waited for, however loaded the host.
    a.drain(quiet_s=5.0, limit_s=10.0)
    assert time.monotonic() - t0 < 2.0
    a.close()
