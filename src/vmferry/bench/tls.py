"""``vmferry bench tls``: what TLS costs a migration, against plain TCP in the same run.

1. Round-0 throughput. A 2 GiB guest, booted and paused, its RAM above 16 MiB filled from
   the host with incompressible data, is migrated by ``MigrationSource`` (in this process)
   to a ``vmferry run --incoming tcp:`` process, plain and over TLS (with ``--tls-creds``),
   over 1 and 2 channels. The cases are interleaved (plain, TLS, plain, TLS …) and
   repeated, as this host is small and noisy; the rate is round 0's bytes ÷ its time from
   the migration's own statistics. Target: TLS ≥ 0.7 × plain for each channel count.
2. Handshakes. Over loopback in this process, the source's side of a connection (TCP
   connect, TLS 1.3 handshake with mutual authentication, the destination's verdict): a
   full handshake, and one that resumes the first connection's session, as a migration's
   extra channels do. Also, per channel, the same span in each TLS migration above; for an
   extra channel it includes the wait until the destination takes the channel, which it
   does only after the main stream's set-up.

Credentials are made for the run (``make_creds``) in a temporary directory.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.bench.table import print_rows
from vmferry.bench.tlswire import MODES as WIRE_MODES
from vmferry.bench.tlswire import WireResult
from vmferry.bench.tlswire import measure as wire
from vmferry.bench.vmm import WSS_BASE, fill_random
from vmferry.errors import VmferryError
from vmferry.machine import Machine, MachineConfig
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.channel import listen, parse_uri
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.migration.tls import TlsClient, TlsServer
from vmferry.migration.tlscerts import make_creds

GIB = 1 << 30
MB = 1e6
TARGET = 0.7
MIGRATION_TIMEOUT_S = 120.0
START_TIMEOUT_S = 30.0
HANDSHAKES = 30  # per kind
MODES = ("plain", "tls")

THROUGHPUT_COLUMNS = (
    "channels",
    "plain-round0-MB/s",
    "tls-round0-MB/s",
    "ratio",
    "target",
    "verdict",
    "plain-runs-MB/s",
    "tls-runs-MB/s",
)
WIRE_COLUMNS = ("mode", "MB/s", "send-cpu-s/GiB", "recv-cpu-s/GiB", "runs-MB/s")
HANDSHAKE_COLUMNS = ("where", "kind", "median-ms", "min-ms", "max-ms", "samples", "resumed")


@dataclass
class Runs:
    rates: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    handshakes: dict[tuple[int, bool], list[float]] = field(default_factory=dict)


def _destination(port: int, serial: Path, creds: Path | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "vmferry.cli.main", "run", "--incoming"]
    argv += [f"tcp:127.0.0.1:{port}", "--serial", str(serial), "--timeout", "240"]
    if creds is not None:
        argv += ["--tls-creds", str(creds)]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _wait_listening(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    line = b""
    while b"waiting for a migration" not in line:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise VmferryError(f"the destination did not start: {line.decode(errors='replace')}")
        line = proc.stderr.readline()


def _free_port() -> int:
    s = listen(parse_uri("tcp:127.0.0.1:0"))
    port: int = s.getsockname()[1]
    s.close()
    return port


def migrate_once(m: Machine, channels: int, creds: Path | None, workdir: Path) -> MigrationSource:
    port = _free_port()
    proc = _destination(port, workdir / "dst.serial", creds)
    try:
        _wait_listening(proc)
        params = MigrationParameters(
            multifd_channels=channels, tls_creds=str(creds) if creds else ""
        )
        src = MigrationSource(
            m, f"tcp:127.0.0.1:{port}", params, MigrationCapabilities(multifd=channels > 1)
        )
        src.start()
        if not src.wait(MIGRATION_TIMEOUT_S):
            src.cancel()
            src.wait(30)
            raise VmferryError(f"the migration did not end within {MIGRATION_TIMEOUT_S:.0f} s")
        if src.stats.status != "completed":
            raise VmferryError(f"the migration {src.stats.status}: {src.stats.error}")
        _, err = proc.communicate(timeout=MIGRATION_TIMEOUT_S)
        if proc.returncode != 0:
            raise VmferryError(f"the destination exited {proc.returncode}: {err.decode()[-500:]}")
        return src
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def bench_throughput(
    memory: int, channel_counts: tuple[int, ...], repeats: int, creds: Path, log: Any
) -> Runs:
    runs = Runs()
    config = MachineConfig(memory=memory, vcpus=1, image="memtouch", cmdline="wss=4K rounds=1")
    with Machine.boot(config, serial=io.BytesIO()) as m, tempfile.TemporaryDirectory() as wd:
        fill_random(m.memory, WSS_BASE)
        m.start(paused=True)
        m.pause()
        for rep in range(repeats):
            for channels in channel_counts:
                for mode in MODES:
                    src = migrate_once(m, channels, creds if mode == "tls" else None, Path(wd))
                    r0 = src.stats.rounds[0]
                    rate = r0.bytes / r0.duration_s
                    runs.rates.setdefault((mode, channels), []).append(rate)
                    if src.tls is not None:
                        for h in src.tls.handshakes:
                            key = (h.index, h.resumed)
                            runs.handshakes.setdefault(key, []).append(h.seconds)
                    log(
                        f"run {rep + 1}/{repeats}: {mode}, {channels} channel(s): round 0 "
                        f"{r0.bytes / MB:,.0f} MB at {rate / MB:,.0f} MB/s"
                    )
    return runs


def bench_handshakes(creds: Path, n: int) -> dict[str, list[float]]:
    """Seconds per connection, client side: connect, handshake, verdict."""
    server = TlsServer(str(creds))
    listener = listen(parse_uri("tcp:127.0.0.1:0"))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            for _ in range(2 * n + 1):
                conn, _ = listener.accept()
                server.secure(conn, "source").close()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=serve, name="bench-tls-server", daemon=True)
    t.start()

    def one(client: TlsClient, index: int) -> float:
        t0 = time.perf_counter()
        s = client.secure(socket.create_connection(("127.0.0.1", port)), index)
        dt = time.perf_counter() - t0
        s.close()
        return dt

    out: dict[str, list[float]] = {"full": [], "resumed": []}
    try:
        for _ in range(n):
            out["full"].append(one(TlsClient(str(creds), "127.0.0.1"), 0))
        first = TlsClient(str(creds), "127.0.0.1")
        one(first, 0)  # the session every later connection resumes
        for i in range(n):
            out["resumed"].append(one(first, i + 1))
        if not all(h.resumed for h in first.handshakes[1:]):
            raise VmferryError("a handshake that should have resumed the session did not")
    finally:
        t.join(10)
        listener.close()
    if errors:
        raise VmferryError(f"the TLS bench server failed: {errors[0]}")
    return out


def _mbs(rate: float) -> str:
    return f"{rate / MB:,.0f}"


def throughput_rows(runs: Runs, channel_counts: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for ch in channel_counts:
        plain, tls = runs.rates[("plain", ch)], runs.rates[("tls", ch)]
        ratio = statistics.median(tls) / statistics.median(plain)
        rows.append(
            {
                "channels": ch,
                "plain-round0-MB/s": _mbs(statistics.median(plain)),
                "tls-round0-MB/s": _mbs(statistics.median(tls)),
                "ratio": f"{ratio:.2f}",
                "target": f"≥ {TARGET}",
                "verdict": "met" if ratio >= TARGET else "MISSED",
                "plain-runs-MB/s": " ".join(_mbs(r) for r in plain),
                "tls-runs-MB/s": " ".join(_mbs(r) for r in tls),
            }
        )
    # Misses first: they are what a reader must see.
    rows.sort(key=lambda r: r["verdict"] == "met")
    return rows


def bench_wire(size: int, repeats: int, creds: Path, log: Any) -> list[WireResult]:
    memory = GuestMemory(size, name="tlswire-send")
    try:
        fill_random(memory, 0)
        out = []
        for rep in range(repeats):
            for mode in WIRE_MODES:
                r = wire(mode, memory, size, creds)
                log(f"wire {rep + 1}/{repeats}: {mode}: {r.rate / MB:,.0f} MB/s")
                out.append(r)
        return out
    finally:
        memory.close()


def wire_rows(results: list[WireResult]) -> list[dict[str, Any]]:
    rows = []
    for mode in WIRE_MODES:
        rs = [r for r in results if r.mode == mode]
        rows.append(
            {
                "mode": mode,
                "MB/s": _mbs(statistics.median(r.rate for r in rs)),
                "send-cpu-s/GiB": f"{statistics.median(r.send_cpu_per_gib for r in rs):.2f}",
                "recv-cpu-s/GiB": f"{statistics.median(r.recv_cpu_per_gib for r in rs):.2f}",
                "runs-MB/s": " ".join(_mbs(r.rate) for r in rs),
            }
        )
    return rows


def _hs_row(where: str, kind: str, samples: list[float], resumed: str) -> dict[str, Any]:
    ms = [s * 1e3 for s in samples]
    return {
        "where": where,
        "kind": kind,
        "median-ms": f"{statistics.median(ms):.2f}",
        "min-ms": f"{min(ms):.2f}",
        "max-ms": f"{max(ms):.2f}",
        "samples": len(ms),
        "resumed": resumed,
    }


def handshake_rows(loop: dict[str, list[float]], runs: Runs) -> list[dict[str, Any]]:
    rows = [
        _hs_row("loopback, this process", "full", loop["full"], "no"),
        _hs_row("loopback, this process", "resumed", loop["resumed"], "yes"),
    ]
    for (index, resumed), samples in sorted(runs.handshakes.items()):
        rows.append(
            _hs_row(
                # An extra channel's time includes the wait for the destination to take
                # it (after the main stream's set-up): it is not the handshake alone.
                "TLS migrations above (connect to verdict)",
                f"channel {index}",
                samples,
                "yes" if resumed else "no",
            )
        )
    return rows


def add_parser(which: Any) -> None:
    p = which.add_parser(
        "tls",
        help="migration over TLS against plain TCP: round-0 throughput, handshake times",
        description="Migrate a filled, paused 2 GiB guest plain and over TLS, 1 and 2 "
        "channels, interleaved and repeated; report round-0 throughput (target: TLS ≥ 0.7 × "
        "plain per channel count) and the TLS handshake time with and without session "
        "resumption; then compare ways a TLS channel can write (rate and CPU per GiB). Needs "
        "KVM and about 5 GiB of free memory; about 2 minutes with the default repeats.",
    )
    p.add_argument("--repeats", type=int, default=3, help="migrations per case (median)")
    p.add_argument("--memory-gib", type=int, default=2, help="guest RAM in GiB (default 2)")
    p.add_argument(
        "--wire-gib", type=int, default=1, help="bytes per transport comparison (GiB, 0: skip)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench_tls)


def cmd_bench_tls(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.memory_gib < 1:
        raise VmferryError("--repeats and --memory-gib must be at least 1")

    def log(msg: str) -> None:
        print(f"vmferry bench: {msg}", file=sys.stderr, flush=True)

    channel_counts = (1, 2)
    with tempfile.TemporaryDirectory(prefix="vmferry-bench-tls-") as d:
        creds = Path(d) / "creds"
        make_creds(creds, Path(d) / "ca", ["127.0.0.1"], "bench-source")
        log(f"handshakes: {HANDSHAKES} full and {HANDSHAKES} resumed over loopback")
        loop = bench_handshakes(creds, HANDSHAKES)
        log(f"throughput: {args.memory_gib} GiB guest, {args.repeats} repeats per case")
        runs = bench_throughput(args.memory_gib * GIB, channel_counts, args.repeats, creds, log)
        wires = bench_wire(args.wire_gib * GIB, args.repeats, creds, log) if args.wire_gib else []
    rows = throughput_rows(runs, channel_counts)
    print_rows(
        f"vmferry bench tls: round-0 throughput, {args.memory_gib} GiB filled guest, median of "
        f"{args.repeats} (ratio = TLS / plain, same run, interleaved)",
        THROUGHPUT_COLUMNS,
        rows,
        None,
    )
    hs = handshake_rows(loop, runs)
    print_rows(
        "vmferry bench tls: handshake per connection (connect + TLS 1.3 mutual auth + verdict)",
        HANDSHAKE_COLUMNS,
        hs,
        None,
    )
    wrows = wire_rows(wires) if wires else []
    if wrows:
        print_rows(
            f"vmferry bench tls: one loopback connection, {args.wire_gib} GiB in 32 MiB runs, "
            f"median of {args.repeats} (how a TLS channel writes; CPU per GiB on each side)",
            WIRE_COLUMNS,
            wrows,
            None,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "throughput": rows,
                    "handshakes": hs,
                    "wire": wrows,
                    "rates": {f"{k[0]}-{k[1]}": v for k, v in runs.rates.items()},
                },
                indent=2,
            )
            + "\n"
        )
    return 0
