"""How a TLS channel should write: the ``ssl.MemoryBIO`` pump vmferry uses, against
``ssl.SSLSocket.sendall`` of each buffer and of the buffers joined, and plain ``writev``.

One connection over loopback to a receiver process (``python -m vmferry.bench.tlswire``)
that reads with vmferry's own stream source (plain ``readv``, or the TLS pump) into
populated memory, 32 MiB at a time. The sender writes ``size`` bytes of guest memory
shaped like RAM sections: a 32-byte section header, the 8-byte RAM header, a 16-byte run
table, then a 32 MiB run of pages (a memoryview of the memory). Reported per mode: the
rate, and the CPU seconds each side spent per GiB (steadier than the rate on a shared
host).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vmferry.errors import VmferryError
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.tls import MAX_VERDICT, TlsClient, TlsServer
from vmferry.migration.tlssocket import TlsSink, TlsSocket, TlsSource
from vmferry.migration.transport import Buffer, FdSink, FdSource

RUN = 32 << 20
HEADER = 56  # section header, RAM header, one run
MODES = ("plain-writev", "tls-memorybio-pump", "tls-sslsocket-sendall-each", "tls-sslsocket-joined")
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class WireResult:
    mode: str
    rate: float  # bytes/s
    send_cpu_per_gib: float
    recv_cpu_per_gib: float


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- the receiving process


def _receive_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vmferry.bench.tlswire")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--creds", default="")
    args = p.parse_args(argv)
    memory = GuestMemory(-(-args.bytes // (2 << 20)) * (2 << 20), name="tlswire-recv")
    memory.populate()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT_S)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    conn, _ = listener.accept()
    conn.settimeout(None)
    if args.creds:
        tls = TlsServer(args.creds).secure(conn, "sender")
        src: TlsSource | FdSource = TlsSource(tls, "tls stream")
    else:
        src = FdSource(conn.fileno(), owned=False, name="plain stream")
    head = memoryview(bytearray(HEADER))
    cpu0 = _cpu()
    for pos in range(0, args.bytes, RUN):
        src.readinto(head)
        src.readinto(memory.view(pos, min(RUN, args.bytes - pos)))
    print(json.dumps({"end": time.monotonic(), "cpu": _cpu() - cpu0}), flush=True)
    return 0


# ---- the sender (this process)


class _SslSocketSink:
    """``SSLSocket.sendall``: of each buffer, or of the buffers joined into one."""

    def __init__(self, sock: socket.socket, joined: bool) -> None:
        self.sock, self.joined = sock, joined

    def write(self, bufs: list[Buffer]) -> None:
        if self.joined:
            self.sock.sendall(b"".join(bufs))
        else:
            for b in bufs:
                self.sock.sendall(b)


def _sender(mode: str, port: int, creds: Path) -> tuple[FdSink | TlsSink | _SslSocketSink, object]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    sock.settimeout(None)
    if mode == "plain-writev":
        return FdSink(sock.fileno(), owned=False), sock
    client = TlsClient(str(creds), "127.0.0.1")
    if mode == "tls-memorybio-pump":
        tls: TlsSocket = client.secure(sock, 0)
        return TlsSink(tls), tls
    ssock = client.context.wrap_socket(sock, server_hostname="127.0.0.1")
    verdict = b""
    while b"\n" not in verdict and len(verdict) < MAX_VERDICT:
        verdict += ssock.recv(MAX_VERDICT)
    return _SslSocketSink(ssock, joined=mode == "tls-sslsocket-joined"), ssock


def measure(mode: str, memory: GuestMemory, size: int, creds: Path) -> WireResult:
    argv = [sys.executable, "-m", "vmferry.bench.tlswire", "--bytes", str(size)]
    if mode != "plain-writev":
        argv += ["--creds", str(creds)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(json.loads(proc.stdout.readline())["port"])
        sink, conn = _sender(mode, port, creds)
        header = [bytes(32), bytes(8), bytes(HEADER - 40)]
        cpu0, t0 = _cpu(), time.monotonic()
        for pos in range(0, size, RUN):
            sink.write([*header, memory.view(pos, min(RUN, size - pos))])
        cpu = _cpu() - cpu0
        line = proc.stdout.readline()
        proc.wait(TIMEOUT_S)
        if not line:
            raise VmferryError(f"the {mode} receiver gave no result")
        doc = json.loads(line)
        close = getattr(conn, "close", None)
        if close is not None:
            close()
        gib = size / (1 << 30)
        return WireResult(mode, size / (doc["end"] - t0), cpu / gib, doc["cpu"] / gib)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_receive_main(sys.argv[1:]))
