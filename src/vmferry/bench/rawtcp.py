"""Raw loopback TCP between two processes: the ceiling a migration's RAM copy is held to.

The receiver runs in its own process (``python -m vmferry.bench.rawtcp``), as a vmferry
destination does, and takes the bytes with ``recv_into`` straight into memory of the kind
guest RAM is made of (a memfd, populated before the clock starts). The sender runs in the
caller's process and sends with ``socket.sendall`` from the caller's buffer (guest RAM in
the benchmark), one thread per stream, in slices of one RAM batch. Stream ``i`` carries
bytes ``[i·B/N, (i+1)·B/N)``. Socket options are the kernel's defaults (autotuned
buffers): the link's best, not vmferry's choices.

The time is from just before the first byte is sent (sender) to the last byte received
(receiver); both read CLOCK_MONOTONIC, which is one clock for every process on the host.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from vmferry.errors import VmferryError
from vmferry.memory.guest_memory import GuestMemory

CHUNK = 32 << 20  # one vmferry RAM batch (8192 pages)
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RawResult:
    streams: int
    nbytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.nbytes / self.seconds


def _shares(nbytes: int, streams: int) -> list[tuple[int, int]]:
    return [(nbytes * i // streams, nbytes * (i + 1) // streams) for i in range(streams)]


# ---- the receiving process ---------------------------------------------------------------


def _receive_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vmferry.bench.rawtcp")
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    args = p.parse_args(argv)
    size = -(-args.bytes // (2 << 20)) * (2 << 20)
    memory = GuestMemory(size, name="rawtcp-recv")
    memory.populate()  # as vmferry's destination does before data arrives
    view = memory.view(0, memory.size).cast("B")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(args.streams)
    listener.settimeout(TIMEOUT_S)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    conns = []
    for _ in range(args.streams):
        conn, _addr = listener.accept()
        conn.settimeout(TIMEOUT_S)
        conns.append(conn)
    # The sender opens its connections in stream order, so accept order is stream order.
    ends = [0.0] * args.streams
    errors: list[BaseException] = []

    def recv(i: int, lo: int, hi: int) -> None:
        try:
            pos = lo
            while pos < hi:
                n = conns[i].recv_into(view[pos : min(hi, pos + CHUNK)])
                if n == 0:
                    raise VmferryError(f"stream {i} closed {hi - pos} bytes early")
                pos += n
            ends[i] = time.monotonic()
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=recv, args=(i, lo, hi))
        for i, (lo, hi) in enumerate(_shares(args.bytes, args.streams))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    if errors:
        print(json.dumps({"error": str(errors[0])}), flush=True)
        return 1
    print(json.dumps({"end": max(ends)}), flush=True)
    return 0


# ---- the sending side (the caller's process) ----------------------------------------------


def measure(buf: memoryview, streams: int) -> RawResult:
    """Send all of ``buf`` to a receiver process over ``streams`` loopback connections."""
    nbytes = int(buf.nbytes)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmferry.bench.rawtcp",
            "--streams",
            str(streams),
            "--bytes",
            str(nbytes),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    socks: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if not first:
            raise VmferryError("the raw TCP receiver did not start")
        port = int(json.loads(first)["port"])
        for _ in range(streams):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S))
        view = buf.cast("B")
        start = threading.Barrier(streams + 1)
        errors: list[BaseException] = []

        def send(i: int, lo: int, hi: int) -> None:
            try:
                start.wait()
                for pos in range(lo, hi, CHUNK):
                    socks[i].sendall(view[pos : min(hi, pos + CHUNK)])
            except BaseException as e:
                errors.append(e)

        threads = [
            threading.Thread(target=send, args=(i, lo, hi))
            for i, (lo, hi) in enumerate(_shares(nbytes, streams))
        ]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        start.wait()
        for t in threads:
            t.join()
        if errors:
            raise VmferryError(f"raw TCP send failed: {errors[0]}")
        last = proc.stdout.readline()
        proc.wait(timeout=TIMEOUT_S)
        doc = json.loads(last) if last else {"error": "no answer"}
        if "end" not in doc:
            raise VmferryError(f"raw TCP receiver failed: {doc.get('error')}")
        return RawResult(streams, nbytes, float(doc["end"]) - t0)
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(_receive_main(sys.argv[1:]))
