"""The host's virtual switch: VF ports on one side, a UDP uplink on the other.

Frames come in on the uplink as datagrams (``wire``), are filtered by MAC and port VLAN
and queued on the VF's port; the VF's RX engine takes them from there. While a VF cannot
take frames (RUNNING_P2P, STOP: its RX DMA is stopped) its port holds them, up to a bound,
then drops and counts them. Frames a VF transmits go to a local port, or out of the
uplink to where the destination MAC was learned, or are flooded to the configured
neighbours and every learned endpoint.

After a migration the MAC moves to the destination's switch (:mod:`.mac_moves`: the
announce, the hand-over of what was buffered, the redirect of late senders).

With ``x-verify-hold-output`` the destination's port holds what its VF transmits while
the post-resume audit runs (:class:`~vmferry.devices.nic.port.OutputHold`), then sends
it on or drops it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmferry.devices.nic import wire
from vmferry.devices.nic.host import HostConfig, PfConfig, parse_addr
from vmferry.devices.nic.mac_moves import MacMoves
from vmferry.devices.nic.port import OutputHold, Port
from vmferry.devices.nic.wire import Addr
from vmferry.errors import ConfigError

__all__ = ["HostSwitch", "OutputHold", "Port", "close_host", "figures_path", "host_switch"]

log = logging.getLogger(__name__)

SOCKET_BUFFER = 8 << 20


class HostSwitch(MacMoves):
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
