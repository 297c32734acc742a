"""Two "hosts" in one process, a VM with a VF running netecho, a traffic peer, and a live
migration between the hosts: what the tests and ``vmferry bench nic`` share.

Each host is a state directory with a PF whose switch listens on its own loopback UDP
port; the hosts are each other's neighbours, so the destination's announce reaches the
source's switch, which hands over what it buffered and floods the announce to the peer.
"""

from __future__ import annotations

import io
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.devices.nic import HostConfig, close_host, host_switch, on_host
from vmferry.devices.nic.regs import parse_mac
from vmferry.devices.nic.switch import Port
from vmferry.devices.nic.vf import VirtualFunction
from vmferry.machine import Machine, MachineConfig
from vmferry.migration.destination import IncomingResult
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.testing.harness import InProcessDestination, MigrationRun, migrate
from vmferry.traffic.peer import TrafficPeer, TrafficReport

PF = "pf0"


def free_udp_port(ip: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        port: int = s.getsockname()[1]
        return port


def make_hosts(root: Path, n: int = 2, *, buffer: int = 4096, queues: int = 1) -> list[Path]:
    """``n`` host state directories under ``root``, PF ``pf0`` with one VF each (same
    MAC everywhere), switches on free loopback ports, every host the others' neighbour."""
    ports = [free_udp_port() for _ in range(n)]
    hosts = []
    for i in range(n):
        d = root / f"host{i}"
        cfg = HostConfig(d)
        cfg.set_numvfs(
            PF,
            1,
            uplink=f"127.0.0.1:{ports[i]}",
            neighbours=[f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i],
            buffer=buffer,
        )
        cfg.config_vf(PF, 0, queues=queues)
        hosts.append(d)
    return hosts


@dataclass
class Outcome:
    source: MigrationSource
    dest: IncomingResult | None
    dest_error: BaseException | None
    traffic: TrafficReport
    source_out: io.BytesIO
    dest_out: io.BytesIO
    dropped: int  # frames the switches' port buffers dropped (over their bound)
    buffered: int  # most frames a source port held during the downtime
    forwarded: int  # frames the source switch handed to the destination
    guest_exit: int | None = None
    notes: list[str] = field(default_factory=list)
    # The destination port's output hold (x-verify-hold-output): held, released, dropped,
    # overflow; None if nothing was held.
    hold: dict[str, int] | None = None
    answered_after: int = 0  # echoes of frames sent after the migration had ended

    def result(self, out: io.BytesIO) -> str | None:
        for line in reversed(out.getvalue().decode(errors="replace").splitlines()):
            if line.startswith("RESULT "):
                return line.split()[1]
        return None


def _port(m: Machine) -> Port:
    dev = m.devices[0]
    assert isinstance(dev, VirtualFunction)
    return dev.port


def migrate_under_traffic(
    hosts: list[Path],
    mode: str,
    *,
    rate: float = 1000.0,
    size: int = 128,
    before_s: float = 0.8,
    after_s: float = 1.0,
    memory: int = 64 << 20,
    params: MigrationParameters | None = None,
    caps: MigrationCapabilities | None = None,
    device_options: str = "",
    migrate_options: dict[str, Any] | None = None,
) -> Outcome:
    """Boot netecho on hosts[0] with the VF, send traffic, migrate to hosts[1] while it
    flows, keep it flowing ``after_s``, then stop the peer and the guest (on whichever
    host runs it: the source after a rollback). ``migrate_options`` go to the harness's
    ``migrate`` (e.g. a testing hook)."""
    src_dir, dst_dir = hosts[0], hosts[1]
    spec = f"vf,pf={PF},index=0,dirty={mode}{device_options}"
    cfg = MachineConfig(memory=memory, image="netecho", cmdline="idle=30", devices=(spec,))
    src_out, dst_out = io.BytesIO(), io.BytesIO()
    with on_host(src_dir):
        m = Machine.boot(cfg, serial=src_out)
    try:
        with InProcessDestination(
            serial=dst_out, scope=lambda: on_host(dst_dir), thread_name="incoming"
        ) as destination:
            src_port = _port(m)
            mac = parse_mac(HostConfig(src_dir).read().vf(PF, 0).mac)
            uplink = HostConfig(src_dir).read().pf(PF).uplink.rsplit(":", 1)
            peer = TrafficPeer((uplink[0], int(uplink[1])), mac, rate=rate, size=size)
            m.start()
            peer.start()
            time.sleep(before_s)
            run = migrate(
                m,
                destination=destination,
                params=params,
                caps=caps,
                timeout_s=120,
                **(migrate_options or {}),
            )
            ended = time.monotonic()
            time.sleep(after_s)
            return _outcome(run, m, peer, src_port, dst_dir, mac, ended, (src_out, dst_out))
    finally:
        m.close()


def _outcome(
    run: MigrationRun,
    m: Machine,
    peer: TrafficPeer,
    src_port: Port,
    dst_dir: Path,
    mac: bytes,
    ended: float,
    outs: tuple[io.BytesIO, io.BytesIO],
) -> Outcome:
    """Stop the peer, wait for the guest to end wherever it runs, and gather the figures
    of the ports that carried its MAC."""
    dest = run.result
    report = peer.stop()
    exit_code = None
    running = dest.machine if dest is not None else m
    ex = running.wait(10)
    if ex is not None:
        exit_code = ex.code
    # The destination's port outlives a VM it rolled back (the switch keeps it).
    ports = [src_port] + [p for p in host_switch(dst_dir, PF).ports() if p.mac == mac]
    last_hold = ports[-1].last_hold if len(ports) > 1 else None
    return Outcome(
        run.source,
        dest,
        run.error,
        report,
        outs[0],
        outs[1],
        dropped=sum(p.dropped for p in ports),
        buffered=src_port.high_water,
        forwarded=src_port.forwarded,
        guest_exit=exit_code,
        hold=None if last_hold is None else last_hold.figures(),
        answered_after=peer.echoed_since(ended),
    )


def close_hosts(hosts: list[Path]) -> None:
    for h in hosts:
        close_host(h)
