"""The host's virtual switch: VF ports on one side, a UDP uplink on the other.

Frames come in on the uplink as datagrams (``wire``), are filtered by MAC and port VLAN
and queued on the VF's port; the VF's RX engine takes them from there. While a VF cannot
take frames (RUNNING_P2P, STOP: its RX DMA is stopped) its port holds them, up to a bound,
then drops and counts them. Frames a VF transmits go to a local port, or out of the
uplink to where the destination MAC was learned, or are flooded to the configured
neighbours and every learned endpoint.

After a migration the destination switch announces the VF's MAC (three times, as QEMU's
self-announce repeats its RARP) to its neighbours; a switch that hears the announce for
a MAC it holds stops owning it, forwards what its port buffered and anything that still
arrives to the new owner, and floods the announce once more to the endpoints it learned
(a physical switch floods a RARP to all ports), so an outside peer learns the new place.
An announce only moves a MAC whose VF is not running here: there are never two running
copies of a VM, so one heard while ours runs is stale (a repeat from a destination that
was rolled back) and is answered with our own announce.

With ``x-verify-hold-output`` the destination's port holds what its VF transmits while
the post-resume audit runs (:class:`OutputHold`), then sends it on or drops it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import socket
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.devices.nic import wire
from vmferry.devices.nic.host import HostConfig, PfConfig, parse_addr
from vmferry.devices.nic.wire import Addr
from vmferry.errors import ConfigError

log = logging.getLogger(__name__)

ANNOUNCE_DELAYS_S = (0.0, 0.05, 0.15)  # first announce at once, then two repeats
ORPHAN_TTL_S = 30.0  # a detached port's buffer waits this long for an announce
DEFEND_INTERVAL_S = 1.0  # at most one answer per port to stale announces in this time
# A switch that goes away (its process ends) while a MAC it held lives elsewhere first
# forwards what is still on its way: until no frame for it came for DRAIN_QUIET_S.
DRAIN_QUIET_S = 0.1
DRAIN_LIMIT_S = 2.0
SOCKET_BUFFER = 8 << 20


@dataclass
class OutputHold:
    """The frames a port's VF transmitted while its output is held (already tagged), in
    order, at most ``bound``. Past the bound the *oldest* is dropped (drop-from-front):
    nothing drains until the audit ends, so the newest frames are the ones whose senders
    have not yet given up, and a TCP peer that gets them sees the gap at once (duplicate
    ACKs, fast retransmit) instead of waiting for a timeout. QEMU's net queue (its
    filter-buffer, too) and a switch's egress queue drop the newest (tail drop): they
    drain continuously, so there the tail is what is late."""

    bound: int
    frames: deque[bytes] = field(default_factory=deque)
    dropping: bool = False  # rolled back: what is kept and what still comes is dropped
    held: int = 0  # frames taken in
    released: int = 0  # sent on when the audit passed
    dropped: int = 0  # discarded on a rollback
    overflow: int = 0  # pushed out over the bound

    def keep(self, frame: bytes) -> None:
        self.held += 1
        if self.dropping:
            self.dropped += 1
            return
        if len(self.frames) >= self.bound:
            self.frames.popleft()
            self.overflow += 1
        self.frames.append(frame)

    def figures(self) -> dict[str, int]:
        return {
            "held": self.held,
            "released": self.released,
            "dropped": self.dropped,
            "overflow": self.overflow,
        }


@dataclass
class Port:
    """One VF's port: its filter, the frames waiting for its RX engine, its counters."""

    mac: bytes
    vlan: int
    bound: int
    frames: deque[bytes] = field(default_factory=deque)
    wake: Callable[[], None] | None = None  # tells the VF a frame is waiting
    moved_to: Addr | None = None  # announced elsewhere: forward everything there
    running: bool = True  # its VF runs here: an announce of its MAC from elsewhere is stale
    epoch: int = 0  # changes when the VF starts or stops: older announce repeats end
    hold: OutputHold | None = None  # the VF's transmit, held (x-verify-hold-output)
    last_hold: OutputHold | None = None  # the latest hold, kept for its figures
    stale_announces: int = 0
    told: set[Addr] = field(default_factory=set)  # senders told where the MAC moved to
    redirects: int = 0
    defended_at: float | None = None
    detached_at: float | None = None
    dropped: int = 0  # over the bound
    forwarded: int = 0
    delivered: int = 0
    high_water: int = 0

    def figures(self) -> dict[str, Any]:
        """What ``ip -s link`` would say of this port, and where its MAC lives."""
        return {
            "mac": self.mac.hex(":"),
            "vlan": self.vlan,
            "running": self.running,
            "moved_to": None if self.moved_to is None else f"{self.moved_to[0]}:{self.moved_to[1]}",
            "queued": len(self.frames),
            "delivered": self.delivered,
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "high_water": self.high_water,
            "stale_announces": self.stale_announces,
            "redirects": self.redirects,
            "hold": None if self.last_hold is None else self.last_hold.figures(),
        }


class HostSwitch:
    """One host's switch; :func:`host_switch` gives each host (state directory) one."""

    def __init__(self, name: str, pf: PfConfig) -> None:
        self.name = name
        self.bound = pf.buffer
        self.neighbours = [parse_addr(n) for n in pf.neighbours]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        try:
            self.sock.bind(parse_addr(pf.uplink))
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"{name}: cannot bind the uplink {pf.uplink}: {e}") from e
        self.address: Addr = self.sock.getsockname()
        self._lock = threading.Lock()
        self._ports: dict[bytes, Port] = {}
        self._fdb: dict[bytes, Addr] = {}  # remote MAC → where it was last seen
        self._endpoints: set[Addr] = set()  # everyone who sent us a frame
        self.counters = {"rx": 0, "tx": 0, "unknown": 0, "malformed": 0, "announces": 0}
        self._moved_rx_at = 0.0  # when a frame for a MAC that moved on last came in
        self._alive = True
        self._thread = threading.Thread(target=self._receive, name=f"{name}-uplink", daemon=True)
        self._thread.start()

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

    def close(self) -> None:
        self.drain()
        self._alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(2)

    # ---- ports
    def attach(self, mac: bytes, vlan: int, wake: Callable[[], None]) -> Port:
        """A VF comes up on this host. A buffer left by an earlier holder of the MAC (the
        source of a migration back to this host) is kept."""
        with self._lock:
            old = self._ports.get(mac)
            port = Port(mac, vlan, self.bound, wake=wake)
            if old is not None and old.moved_to is None:
                port.frames = old.frames
            self._ports[mac] = port
            return port

    def detach(self, port: Port) -> None:
        with self._lock:
            port.wake = None
            port.detached_at = time.monotonic()
            self._stand_down(port)

    def stand_down(self, port: Port) -> None:
        """The VF stopped running here (quiesced, or going away): its announce repeats
        end now, and an announce of its MAC from elsewhere moves it."""
        with self._lock:
            self._stand_down(port)

    def _stand_down(self, port: Port) -> None:
        port.running = False
        port.epoch += 1

    def take(self, port: Port, n: int) -> list[bytes]:
        """Up to ``n`` frames waiting on the port (the VF's RX engine)."""
        with self._lock:
            out = [port.frames.popleft() for _ in range(min(n, len(port.frames)))]
            port.delivered += len(out)
            return out

    def peek(self, port: Port) -> bytes | None:
        """The frame at the head of the port's queue, left there."""
        with self._lock:
            return port.frames[0] if port.frames else None

    def ports(self) -> list[Port]:
        with self._lock:
            return list(self._ports.values())

    def figures(self) -> dict[str, Any]:
        """The switch's counters and each port's figures (a failure that explains itself)."""
        with self._lock:
            return {
                "switch": self.name,
                "uplink": f"{self.address[0]}:{self.address[1]}",
                **self.counters,
                "ports": [p.figures() for p in self._ports.values()],
            }

    # ---- frames in
    def _receive(self) -> None:
        while self._alive:
            try:
                data, addr = self.sock.recvfrom(65536)
            except OSError:
                return
            self.handle(data, addr)

    def handle(self, data: bytes, addr: Addr) -> None:
        """One datagram from the uplink (the uplink thread; tests drive it directly)."""
        try:
            dgram = wire.decode(data)
        except wire.WireError as e:
            self.counters["malformed"] += 1
            log.debug("%s: %s from %s", self.name, e, addr)
            return
        if dgram.kind == wire.KIND_ANNOUNCE:
            self._announced(dgram, addr)
            return
        self.counters["rx"] += 1
        frame = dgram.frame
        sender = dgram.origin if dgram.kind == wire.KIND_FORWARD else addr
        if sender is not None and sender != self.address:
            with self._lock:
                self._fdb[wire.src_mac(frame)] = sender
                self._endpoints.add(sender)
        self._switch(frame, from_uplink=True)
        if sender is not None:
            self._redirect(frame, sender)
        if dgram.hops == 0 and sender is not None:
            self._relay(frame, sender)

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

    def _relay(self, frame: bytes, sender: Addr) -> None:
        """A frame from the uplink for a MAC we learned elsewhere on the segment (e.g. a
        migrated VM's first replies, flooded before its new switch learned the peer):
        pass it on once, as the one segment a real L2 network would be."""
        dst = wire.dst_mac(frame)
        with self._lock:
            if dst in self._ports or dst == wire.BROADCAST:
                return
            remote = self._fdb.get(dst)
        if remote is not None and remote != sender:
            self._sendto(wire.encode(wire.KIND_FORWARD, frame, hops=1, origin=sender), remote)

    def _switch(self, frame: bytes, *, from_uplink: bool) -> None:
        dst = wire.dst_mac(frame)
        vlan = wire.vlan_of(frame)
        with self._lock:
            if dst == wire.BROADCAST:
                targets = [p for p in self._ports.values() if p.vlan == vlan and not p.moved_to]
            else:
                port = self._ports.get(dst)
                targets = [port] if port is not None and port.vlan == vlan else []
            wakes = [self._enqueue(p, wire.untag(frame)) for p in targets]
            remote = None if targets or dst == wire.BROADCAST else self._fdb.get(dst)
            if not targets and not remote:
                self.counters["unknown"] += 1
            # Where a flood goes is decided with the lookup that missed, at one instant: an
            # endpoint learned in between (the uplink thread) would get the frame from us
            # and again from a neighbour that relays it there: a delivered frame twice.
            flood = self._flood_targets() if remote is None else set()
        for w in wakes:
            if w is not None:
                w()
        if not from_uplink and (remote or dst == wire.BROADCAST or not targets):
            self._send_out(frame, remote, flood)

    def _enqueue(self, port: Port, frame: bytes) -> Callable[[], None] | None:
        if port.moved_to is not None:
            self._sendto(self._forward(frame), port.moved_to)
            port.forwarded += 1
            return None
        if len(port.frames) >= port.bound:
            port.dropped += 1
            return None
        port.frames.append(frame)
        port.high_water = max(port.high_water, len(port.frames))
        return port.wake

    # ---- frames out
    def transmit(self, port: Port, frame: bytes) -> None:
        """A frame the VF sent: tagged with the port VLAN, switched (or held)."""
        self.counters["tx"] += 1
        tagged = wire.tag(frame, port.vlan)
        with self._lock:
            if port.hold is not None:
                port.hold.keep(tagged)
                return
        self._switch(tagged, from_uplink=False)

    # ---- x-verify-hold-output: the destination's transmit waits for the audit
    def hold(self, port: Port) -> None:
        """From now on what the port's VF transmits is kept, not sent (frames it
        receives still reach it)."""
        with self._lock:
            if port.hold is None:
                port.hold = port.last_hold = OutputHold(self.bound)

    def release(self, port: Port) -> dict[str, int]:
        """Send what was held, in order, and stop holding; the hold's figures. A frame
        the VF transmits meanwhile joins the end of the queue, so none overtakes."""
        hold = port.hold
        if hold is None:
            return OutputHold(self.bound).figures()
        while True:
            with self._lock:
                if hold.dropping:  # a drop is final: nothing of it goes out
                    return hold.figures()
                if not hold.frames:
                    port.hold = None
                    return hold.figures()
                frame = hold.frames.popleft()
                hold.released += 1
            self._switch(frame, from_uplink=False)

    def drop(self, port: Port) -> dict[str, int]:
        """Discard what was held, and anything the VF still transmits: the VM it belongs
        to was rolled back to its source (until the VF runs here again, a new start)."""
        with self._lock:
            if port.hold is None:
                port.hold = port.last_hold = OutputHold(self.bound)
            hold = port.hold
            hold.dropping = True
            hold.dropped += len(hold.frames)
            hold.frames.clear()
            return hold.figures()

    def _flood_targets(self) -> set[Addr]:
        """Everyone a frame for an unknown MAC goes to (the caller holds the lock)."""
        return set(self.neighbours) | self._endpoints

    def _send_out(self, frame: bytes, remote: Addr | None, flood: set[Addr]) -> None:
        data = wire.encode(wire.KIND_DATA, frame)
        for addr in [remote] if remote is not None else flood:
            self._sendto(data, addr)

    def _forward(self, frame: bytes) -> bytes:
        """A FORWARD datagram naming where the frame's sender was learned (or us)."""
        origin = self._fdb.get(wire.src_mac(frame), self.address)
        return wire.encode(wire.KIND_FORWARD, frame, origin=origin)

    def _sendto(self, data: bytes, addr: Addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError as e:  # a neighbour that is down must not stop the switch
            log.debug("%s: send to %s failed: %s", self.name, addr, e)

    # ---- migration: the MAC moves
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


_switches: dict[tuple[Path, str], HostSwitch] = {}
_switches_lock = threading.Lock()
FIGURES_FILE = "switch-{pf}.json"  # in the host's state directory, as the process ends


def figures_path(state_dir: Path, pf: str) -> Path:
    """Where a host's switch leaves its figures when its process ends (read by tests and
    by whoever asks why a frame went missing: the switch itself is gone by then)."""
    return Path(state_dir) / FIGURES_FILE.format(pf=pf)


def _at_exit() -> None:
    """The process ends: each switch forwards what it still owes a moved MAC, then
    leaves its figures in the host's state directory."""
    with _switches_lock:
        switches = list(_switches.items())
    for (state_dir, pf), sw in switches:
        sw.drain()
        with contextlib.suppress(OSError):
            figures_path(state_dir, pf).write_text(json.dumps(sw.figures(), indent=2) + "\n")


atexit.register(_at_exit)


def host_switch(state_dir: Path, pf: str) -> HostSwitch:
    """The switch of ``pf`` on the host with ``state_dir``, started on first use."""
    key = (Path(state_dir).resolve(), pf)
    with _switches_lock:
        sw = _switches.get(key)
        if sw is None:
            cfg = HostConfig(state_dir).read().pf(pf)
            sw = _switches[key] = HostSwitch(f"{state_dir.name}/{pf}", cfg)
        return sw


def close_host(state_dir: Path) -> None:
    """Stop every switch of that host in this process (tests, benchmarks)."""
    key_dir = Path(state_dir).resolve()
    with _switches_lock:
        for key in [k for k in _switches if k[0] == key_dir]:
            _switches.pop(key).close()
