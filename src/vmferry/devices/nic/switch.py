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
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmferry.devices.nic import wire
from vmferry.devices.nic.host import HostConfig, PfConfig, parse_addr
from vmferry.devices.nic.wire import Addr
from vmferry.errors import ConfigError

log = logging.getLogger(__name__)

ANNOUNCE_DELAYS_S = (0.0, 0.05, 0.15)  # first announce at once, then two repeats
ORPHAN_TTL_S = 30.0  # a detached port's buffer waits this long for an announce
SOCKET_BUFFER = 8 << 20


@dataclass
class Port:
    """One VF's port: its filter, the frames waiting for its RX engine, its counters."""

    mac: bytes
    vlan: int
    bound: int
    frames: deque[bytes] = field(default_factory=deque)
    wake: Callable[[], None] | None = None  # tells the VF a frame is waiting
    moved_to: Addr | None = None  # announced elsewhere: forward everything there
    detached_at: float | None = None
    dropped: int = 0  # over the bound
    forwarded: int = 0
    delivered: int = 0
    high_water: int = 0


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
        self._alive = True
        self._thread = threading.Thread(target=self._receive, name=f"{name}-uplink", daemon=True)
        self._thread.start()

    def close(self) -> None:
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
        if dgram.hops == 0 and sender is not None:
            self._relay(frame, sender)

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
        """A frame the VF sent: tagged with the port VLAN, switched."""
        self.counters["tx"] += 1
        self._switch(wire.tag(frame, port.vlan), from_uplink=False)

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
    def announce(self, mac: bytes) -> None:
        """This host owns ``mac`` now: tell the neighbours and everyone we learned, from a
        timer thread so the VF's arc does not wait for the repeats."""
        data = wire.encode(wire.KIND_ANNOUNCE, wire.rarp_frame(mac), origin=self.address)

        def send() -> None:
            t0 = time.monotonic()
            for delay in ANNOUNCE_DELAYS_S:
                time.sleep(max(0.0, t0 + delay - time.monotonic()))
                with self._lock:
                    targets = set(self.neighbours) | self._endpoints
                for addr in targets:
                    self._sendto(data, addr)

        self.counters["announces"] += 1
        threading.Thread(target=send, name=f"{self.name}-announce", daemon=True).start()

    def _announced(self, dgram: wire.Datagram, sender: Addr) -> None:
        mac = wire.src_mac(dgram.frame)
        origin = dgram.origin
        if origin is None or origin == self.address:
            return
        with self._lock:
            self._fdb[mac] = origin
            port = self._ports.get(mac)
            backlog: list[bytes] = []
            if port is not None:
                # The MAC lives elsewhere now (our VF was migrated away; the last announce
                # wins, as in a learning switch): hand over what waited here.
                port.moved_to = origin
                backlog = list(port.frames)
                port.frames.clear()
                port.forwarded += len(backlog)
            refloodable = dgram.hops == 0
            flood = self._endpoints - {sender, origin} if refloodable else set()
        for frame in backlog:
            self._sendto(self._forward(frame), origin)
        if flood:
            again = wire.encode(wire.KIND_ANNOUNCE, dgram.frame, hops=dgram.hops + 1, origin=origin)
            for addr in flood:
                self._sendto(again, addr)

    def reclaim(self, port: Port) -> bool:
        """The VF runs here again (a migration back, or a failed one rolled back after
        an announce): this port owns its MAC; True if it had moved (announce it then)."""
        with self._lock:
            moved = port.moved_to is not None
            port.moved_to = None
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
