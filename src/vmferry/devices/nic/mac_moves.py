"""How a host switch follows a MAC that moves between hosts (a migrated VM's VF).

After a migration the destination switch announces the VF's MAC (three times, as QEMU's
self-announce repeats its RARP) to its neighbours; a switch that hears the announce for
a MAC it holds stops owning it, forwards what its port buffered and anything that still
arrives to the new owner, and floods the announce once more to the endpoints it learned
(a physical switch floods a RARP to all ports), so an outside peer learns the new place.
An announce only moves a MAC whose VF is not running here: there are never two running
copies of a VM, so one heard while ours runs is stale (a repeat from a destination that
was rolled back) and is answered with our own announce.

:class:`MacMoves` holds these methods of :class:`~vmferry.devices.nic.switch.HostSwitch`;
they work on the switch's state, under its lock.
"""

from __future__ import annotations

import fcntl
import socket
import sys
import termios
import threading
import time

from vmferry.devices.nic import wire
from vmferry.devices.nic.port import Port
from vmferry.devices.nic.wire import Addr

ANNOUNCE_DELAYS_S = (0.0, 0.05, 0.15)  # first announce at once, then two repeats
ORPHAN_TTL_S = 30.0  # a detached port's buffer waits this long for an announce
DEFEND_INTERVAL_S = 1.0  # at most one answer per port to stale announces in this time
# A switch that goes away (its process ends) while a MAC it held lives elsewhere first
# forwards what is still on its way: until no frame for it came for DRAIN_QUIET_S.
DRAIN_QUIET_S = 0.1
DRAIN_LIMIT_S = 2.0


class MacMoves:
    """The switch's side of a MAC that moves: announce it, hear it announced, tell late
    senders, take it back, forward what is still owed before going away."""

    # The switch's state, set up by HostSwitch.__init__.
    name: str
    address: Addr
    neighbours: list[Addr]
    sock: socket.socket
    counters: dict[str, int]
    _lock: threading.Lock
    _ports: dict[bytes, Port]
    _fdb: dict[bytes, Addr]
    _endpoints: set[Addr]
    _moved_rx_at: float
    _alive: bool

    def _sendto(self, data: bytes, addr: Addr) -> None:
        raise NotImplementedError  # HostSwitch's: the uplink socket

    def _forward(self, frame: bytes) -> bytes:
        raise NotImplementedError  # HostSwitch's: a FORWARD datagram

    def drain(self, quiet_s: float = DRAIN_QUIET_S, limit_s: float = DRAIN_LIMIT_S) -> None:
        """Before the switch goes away: while a MAC it held lives elsewhere, frames for it
        may still wait in the socket or be on their way (sent before their sender heard
        of the move). A host's switch outlives a VM; this one lives in the VM's process,
        so it forwards them before that process lets it go: until none is waiting and
        none came for ``quiet_s``, at most ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while self._alive and time.monotonic() < deadline:
            with self._lock:
                owes = any(p.moved_to is not None for p in self._ports.values())
                quiet = time.monotonic() - self._moved_rx_at >= quiet_s
            if not owes or (quiet and not self._pending()):
                return
            time.sleep(0.01)

    def _pending(self) -> bool:
        """A datagram waits in the uplink socket (FIONREAD: the next one's size)."""
        try:
            n = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return int.from_bytes(n, sys.byteorder) > 0

    def _redirect(self, frame: bytes, sender: Addr) -> None:
        """A frame for a MAC that moved on, from a sender that has not been told: tell it
        where the MAC lives now (an announce, once per sender and move; hops=1, so a
        switch does not flood it on). The flood at the move reaches only the senders
        known then: one that spoke first later, or lost that datagram, would otherwise
        go on sending here, and lose everything once this switch is gone."""
        with self._lock:
            port = self._ports.get(wire.dst_mac(frame))
            if port is None or port.moved_to is None:
                return
            self._moved_rx_at = time.monotonic()
            where = port.moved_to
            if sender in (where, self.address) or sender in port.told:
                return
            port.told.add(sender)
            port.redirects += 1
            # Sent under the lock: a reclaim (the MAC back here, announced) comes after it,
            # so the sender ends up where the MAC is, not where it was.
            rarp = wire.rarp_frame(port.mac)
            self._sendto(wire.encode(wire.KIND_ANNOUNCE, rarp, hops=1, origin=where), sender)

    def announce(
        self, port: Port, delays: tuple[float, ...] = ANNOUNCE_DELAYS_S
    ) -> threading.Thread:
        """This host owns the port's MAC now: tell the neighbours and everyone we learned,
        from a timer thread so the VF's arc does not wait for the repeats. The repeats
        end once the VF stops or the MAC moves on: a destination that was rolled back
        must not take the MAC back from the source that runs the VM again."""
        data = wire.encode(wire.KIND_ANNOUNCE, wire.rarp_frame(port.mac), origin=self.address)
        with self._lock:
            epoch = port.epoch

        def send() -> None:
            t0 = time.monotonic()
            for delay in delays:
                time.sleep(max(0.0, t0 + delay - time.monotonic()))
                # Sent under the lock: once stand_down has returned, no repeat goes out.
                with self._lock:
                    if port.epoch != epoch or not port.running or port.moved_to is not None:
                        return
                    for addr in set(self.neighbours) | self._endpoints:
                        self._sendto(data, addr)

        self.counters["announces"] += 1
        thread = threading.Thread(target=send, name=f"{self.name}-announce", daemon=True)
        thread.start()
        return thread

    def _announced(self, dgram: wire.Datagram, sender: Addr) -> None:
        mac = wire.src_mac(dgram.frame)
        origin = dgram.origin
        if origin is None or origin == self.address:
            return
        backlog: list[bytes] = []
        flood: set[Addr] = set()
        with self._lock:
            port = self._ports.get(mac)
            if port is not None and port.running:
                # Ours runs here, so the announce is stale: never two running copies.
                defend = self._stale(port)
            else:
                defend = False
                self._fdb[mac] = origin
                if port is not None:
                    # The MAC lives elsewhere now (our VF was migrated away; the last
                    # announce wins, as in a learning switch): hand over what waited here.
                    if port.moved_to != origin:
                        port.told = set()
                    port.moved_to = origin
                    self._moved_rx_at = time.monotonic()
                    backlog = list(port.frames)
                    port.frames.clear()
                    port.forwarded += len(backlog)
                if dgram.hops == 0:
                    flood = self._endpoints - {sender, origin}
                    if port is not None:
                        port.told |= flood
        if defend and port is not None:
            self.announce(port, delays=(0.0,))
        for frame in backlog:
            self._sendto(self._forward(frame), origin)
        if flood:
            again = wire.encode(wire.KIND_ANNOUNCE, dgram.frame, hops=dgram.hops + 1, origin=origin)
            for addr in flood:
                self._sendto(again, addr)

    def _stale(self, port: Port) -> bool:
        """An announce of a MAC whose VF runs here (the caller holds the lock): counted
        and ignored; True if we answer it (at most once per DEFEND_INTERVAL_S, so two
        switches that both think they own a MAC do not answer each other forever)."""
        port.stale_announces += 1
        now = time.monotonic()
        if port.defended_at is not None and now - port.defended_at < DEFEND_INTERVAL_S:
            return False
        port.defended_at = now
        return True

    def reclaim(self, port: Port) -> bool:
        """The VF runs here (again: a migration back, or a failed one rolled back after
        an announce): this port owns its MAC; True if it had moved (announce it then).
        A hold set before the VF started stays (the destination holds, then starts)."""
        with self._lock:
            moved = port.moved_to is not None
            port.moved_to = None
            port.told = set()
            port.running = True
            port.epoch += 1
            port.detached_at = None
            if port.hold is not None and port.hold.dropping:
                port.hold = None
            self._ports[port.mac] = port
            return moved

    def expire_orphans(self) -> int:
        """Drop buffers of detached ports nobody announced within ORPHAN_TTL_S."""
        now, n = time.monotonic(), 0
        with self._lock:
            for mac, p in list(self._ports.items()):
                if p.detached_at is not None and now - p.detached_at > ORPHAN_TTL_S:
                    p.dropped += len(p.frames)
                    n += len(p.frames)
                    p.frames.clear()
                    if not p.moved_to:
                        del self._ports[mac]
        return n
