"""A traffic peer: numbered frames at a steady rate to a VM's MAC over a host switch's
UDP uplink, every echo checked.

The peer follows the VM: an announce for the VM's MAC (from the switch it now lives
behind, or flooded on by the one it left) moves the target. The report says what a user
of the connection saw: frames sent, echoed, lost, duplicated, reordered and corrupted,
and the longest gap between two echoes — the service downtime.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vmferry.devices.nic import wire
from vmferry.devices.nic.wire import Addr
from vmferry.traffic import frames as f


@dataclass
class TrafficReport:
    sent: int = 0
    echoed: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    longest_gap_ms: float = 0.0
    gap_start_s: float = 0.0  # when the longest gap began, seconds from the first send
    rtt_median_ms: float = 0.0
    rtt_max_ms: float = 0.0
    moves: list[tuple[float, str]] = field(default_factory=list)  # (s, "ip:port") learned
    lost_at_s: list[float] = field(default_factory=list)  # send times of lost frames
    duplicated_at_s: list[float] = field(default_factory=list)  # send times of frames echoed twice
    duration_s: float = 0.0
    started_at: float = 0.0  # time.monotonic() of the first send
    rate: float = 0.0
    guest: dict[str, int] | None = None  # netecho's counters from its STOP answer
    expected_result: str = ""  # netecho's RESULT for the frames echoed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lost_at_s"] = [round(t, 4) for t in self.lost_at_s[:100]]
        d["duplicated_at_s"] = [round(t, 4) for t in self.duplicated_at_s[:100]]
        return d

    def summary(self) -> str:
        return (
            f"sent {self.sent}, echoed {self.echoed}, lost {self.lost}, duplicated "
            f"{self.duplicated}, reordered {self.reordered}, corrupted {self.corrupted}, "
            f"longest gap {self.longest_gap_ms:.1f} ms"
        )


def _peer_mac() -> bytes:
    return bytes([0x02, 0x70]) + os.urandom(4)


class TrafficPeer:
    """Sends PINGs at ``rate`` frames/s of ``size`` bytes to ``mac`` via ``target``."""

    def __init__(
        self,
        target: Addr,
        mac: bytes,
        *,
        rate: float = 1000.0,
        size: int = 128,
        bind: Addr = ("0.0.0.0", 0),
        vlan: int = 0,
        flows: int = 1,
    ) -> None:
        if rate <= 0 or not f.ETH.size + f.HEAD.size <= size <= f.MAX_BODY:
            raise ValueError(f"rate {rate} or frame size {size} is out of range")
        self.target = target
        self.vm_mac = mac
        self.mac = _peer_mac()
        self.rate, self.size, self.vlan, self.flows = rate, size, vlan, flows
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(bind)
        self.sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._sent_at: list[float] = []
        self._echo_at: dict[int, float] = {}
        self._rtts: list[float] = []
        self._dups = self._reordered = self._corrupt = 0
        self._dup_seqs: list[int] = []
        self._max_seq = -1
        self._last_echo = 0.0
        self._gap = (0.0, 0.0)
        self._moves: list[tuple[float, str]] = []
        self._result: dict[str, int] | None = None
        self._sending = threading.Event()
        self._alive = True
        self._t0 = 0.0
        self._rx = threading.Thread(target=self._receive, name="peer-rx", daemon=True)
        self._tx = threading.Thread(target=self._send, name="peer-tx", daemon=True)

    # ---- control
    def start(self) -> None:
        self._t0 = time.monotonic()
        self._sending.set()
        self._rx.start()
        self._tx.start()

    def stop(self, grace_s: float = 0.5, stop_guest: bool = True) -> TrafficReport:
        """Stop sending, wait ``grace_s`` for the last echoes, optionally end netecho."""
        self._sending.clear()
        self._tx.join()
        t_end = time.monotonic()
        time.sleep(grace_s)
        if stop_guest:
            self.stop_guest()
        self._alive = False
        self._rx.join(2)
        self.sock.close()
        return self._report(t_end)

    def stop_guest(self, timeout_s: float = 5.0) -> dict[str, int] | None:
        """Ask netecho to end (a STOP until it answers with its counters)."""
        deadline = time.monotonic() + timeout_s
        while self._result is None and time.monotonic() < deadline:
            frame = f.stop(self.vm_mac, self.mac, len(self._sent_at))
            self._sendto(wire.encode(wire.KIND_DATA, wire.tag(frame, self.vlan)))
            time.sleep(0.1)
        return self._result

    def echoed_since(self, t: float) -> int:
        """Echoes of the frames sent at or after ``t`` (``time.monotonic()``): whether
        the VM answered after some moment (a rollback), counted by sequence number."""
        with self._lock:
            return sum(1 for seq in self._echo_at if self._sent_at[seq] >= t)

    def _sendto(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(data, self.target)

    # ---- threads
    def _send(self) -> None:
        interval = 1.0 / self.rate
        seq = 0
        while self._sending.is_set():
            now = time.monotonic()
            due = self._t0 + seq * interval
            if due > now:
                time.sleep(min(due - now, 0.01))
                continue
            frame = f.ping(
                self.vm_mac, self.mac, seq, time.monotonic_ns(), self.size, seq % self.flows
            )
            with self._lock:
                self._sent_at.append(time.monotonic())
            self._sendto(wire.encode(wire.KIND_DATA, wire.tag(frame, self.vlan)))
            seq += 1

    def _receive(self) -> None:
        while self._alive:
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                dgram = wire.decode(data)
            except wire.WireError:
                continue
            now = time.monotonic()
            if dgram.kind == wire.KIND_ANNOUNCE:
                if wire.src_mac(dgram.frame) == self.vm_mac and dgram.origin != self.target:
                    assert dgram.origin is not None
                    self.target = dgram.origin
                    self._moves.append((now - self._t0, f"{dgram.origin[0]}:{dgram.origin[1]}"))
                continue
            self._echo(wire.untag(dgram.frame), now)

    def _echo(self, frame: bytes, now: float) -> None:
        if len(frame) < f.ETH.size + f.HEAD.size:
            return
        dst, src, etype = f.ETH.unpack_from(frame)
        if dst != self.mac or etype != f.ETHERTYPE:
            return
        magic, _flow, seq, _sent_ns = f.HEAD.unpack_from(frame, f.ETH.size)
        if magic == f.MAGIC_RESULT:
            rx, tx, bad, result = f.RESULT_BODY.unpack_from(frame, f.ETH.size + f.HEAD.size)
            self._result = {"received": rx, "echoed": tx, "bad": bad, "result": result}
            return
        if magic != f.MAGIC_ECHO:
            return
        payload = frame[f.ETH.size + f.HEAD.size :]
        with self._lock:
            if seq >= len(self._sent_at):
                self._corrupt += 1
                return
            if payload != f.body(seq, len(payload), echo=True) or src != self.vm_mac:
                self._corrupt += 1
                return
            if seq in self._echo_at:
                self._dups += 1
                self._dup_seqs.append(seq)
                return
            if seq < self._max_seq:
                self._reordered += 1
            self._max_seq = max(self._max_seq, seq)
            self._echo_at[seq] = now
            self._rtts.append(now - self._sent_at[seq])
            if self._last_echo and self._sending.is_set():
                gap = now - self._last_echo
                if gap > self._gap[0]:
                    self._gap = (gap, self._last_echo - self._t0)
            self._last_echo = now

    def _report(self, t_end: float) -> TrafficReport:
        with self._lock:
            sent = len(self._sent_at)
            lost_at = [t - self._t0 for s, t in enumerate(self._sent_at) if s not in self._echo_at]
            rtts = sorted(self._rtts)
            h = f.ResultHash()
            for seq in self._echo_at:
                h.add(seq)
            return TrafficReport(
                sent=sent,
                echoed=len(self._echo_at),
                lost=len(lost_at),
                duplicated=self._dups,
                reordered=self._reordered,
                corrupted=self._corrupt,
                longest_gap_ms=self._gap[0] * 1e3,
                gap_start_s=self._gap[1],
                rtt_median_ms=rtts[len(rtts) // 2] * 1e3 if rtts else 0.0,
                rtt_max_ms=rtts[-1] * 1e3 if rtts else 0.0,
                moves=list(self._moves),
                lost_at_s=lost_at,
                duplicated_at_s=[self._sent_at[s] - self._t0 for s in self._dup_seqs],
                duration_s=t_end - self._t0,
                started_at=self._t0,
                rate=self.rate,
                guest=self._result,
                expected_result=f"{h.value():016x}",
            )
