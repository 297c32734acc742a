"""Round 0 of a migration, and where the host's cores go while it runs.

Run: ``.venv/bin/python bench/round0.py [--repeats 3] [--verify on|off] [--big]``.

Two cases, each repeated, interleaved with its baseline:

- **paused**: a 1 GiB guest booted and never run, RAM above 32 MiB random (no zero pages),
  migrated on 1 and on 2 channels to a ``vmferry run --incoming … --prealloc`` process,
  next to raw loopback TCP (``vmferry.bench.rawtcp``: recv_into populated memory) over as
  many streams, measured just before;
- **dirtying**: ``memtouch wss=256M`` unpaced on a 1 GiB guest (with ``--big`` also 4 GiB),
  RAM outside the working set random, migrated on 2 channels 1.5 s after the guest
  started, to a fresh destination and to a ``--prealloc`` one.

Each migration is cancelled once round 0 is over: the rounds after it are the policy's.

Round 0's rate is its bytes ÷ its time from the migration's own record. Over round 0's
window, each thread's CPU (``/proc/PID/task/*/stat``, user + system, % of one core) in the
source (named) and the destination (by thread id), the share of both cores the two
processes got, and the host's load average: on a 2-core host another process's load moves
every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from vmferry.bench import rawtcp
from vmferry.machine import Machine, MachineConfig
from vmferry.memory import GuestMemory
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource

GIB = 1 << 30
HZ = os.sysconf("SC_CLK_TCK")
WSS_PAGES = (16 << 20 >> 12) + (256 << 20 >> 12)  # memtouch's working set ends here

Ticks = dict[int, int]


def _ticks(pid: int) -> Ticks:
    out: Ticks = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[int(t)] = int(fields[11]) + int(fields[12])
    return out


def _host() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # all, idle + iowait


@dataclass
class Sample:
    t: float
    host: tuple[int, int]
    tasks: dict[int, Ticks]


@dataclass
class Sampler:
    pids: list[int]
    samples: list[Sample] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, daemon=True)
        t.start()
        return t

    def _run(self) -> None:
        while not self._stop.is_set():
            tasks = {p: _ticks(p) for p in self.pids}
            self.samples.append(Sample(time.monotonic(), _host(), tasks))
            for th in threading.enumerate():
                if th.native_id is not None:
                    self.names[th.native_id] = th.name
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()

    def window(self, t0: float, t1: float) -> dict[str, object]:
        a = min(self.samples, key=lambda s: abs(s.t - t0))
        b = min(self.samples, key=lambda s: abs(s.t - t1))
        dt = max(b.t - a.t, 1e-3)
        busy = 1 - (b.host[1] - a.host[1]) / max(b.host[0] - a.host[0], 1)
        threads: dict[str, float] = {}
        for label, pid in zip(("src", "dst"), self.pids, strict=True):
            for tid, ticks in b.tasks[pid].items():
                pct = (ticks - a.tasks[pid].get(tid, 0)) / HZ / dt * 100
                if pct >= 2:  # Python 3.11 names no OS thread: the destination's are by id
                    name = "main" if tid == pid else str(tid)
                    if label == "src":
                        name = self.names.get(tid, name)
                    threads[f"{label}:{name}"] = pct
        return {
            "host_busy_pct": round(200 * busy),
            "ours_pct": round(sum(threads.values())),
            "cpu_s": round(sum(threads.values()) / 100 * dt, 2),  # of the threads listed
            "load": round(os.getloadavg()[0], 1),
            "threads": {k: round(v) for k, v in threads.items()},
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fill_random(m: Machine, first_page: int) -> None:
    pages = m.memory.pages()
    rng = np.random.default_rng(1)
    for a in range(first_page, pages.shape[0], 65536):
        blk = pages[a : a + 65536]
        blk[:] = rng.integers(0, 2**63, size=blk.shape, dtype=np.uint64)


def round0(mode: str, gib: int, channels: int, *, prealloc: bool, verify: str) -> dict[str, object]:
    """One migration; round 0's rate and the cores over its window."""
    port = _free_port()
    dst = subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", "run", "--incoming", f"tcp:127.0.0.1:{port}"]
        + ["--timeout", "60", "--serial", os.devnull]
        + (["--prealloc", f"{gib}G"] if prealloc else []),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        assert dst.stderr is not None
        dst.stderr.readline()  # "waiting for a migration on …": it listens
        paused = mode == "paused"
        cmdline = "wss=1M rate=1" if paused else "wss=256M rounds=1000000 seed=5"
        config = MachineConfig(memory=gib * GIB, image="memtouch", cmdline=cmdline)
        with Machine.boot(config, serial=io.BytesIO()) as m:
            _fill_random(m, 8192 if paused else WSS_PAGES)
            m.start(paused=paused)
            if not paused:
                time.sleep(1.5)  # the guest's own fill of its working set
            sampler = Sampler([os.getpid(), dst.pid])
            sampler.start()
            mig = MigrationSource(
                m,
                f"tcp:127.0.0.1:{port}",
                MigrationParameters(multifd_channels=channels, verify=verify),
                MigrationCapabilities(multifd=channels > 1),
            )
            mig.start()
            deadline = time.monotonic() + 60
            while not mig.snapshot().rounds and time.monotonic() < deadline:
                if mig.wait(0.05):
                    break
            # Round 0 is what is measured: the rest of the migration is the policy's.
            mig.cancel("round0 bench: round 0 is over")
            mig.wait(10)
            sampler.stop()
            st = mig.snapshot()
            if not st.rounds:
                return {"error": st.error or st.status}
            r0 = st.rounds[0]
            t0 = mig.started_at + r0.start_s
            return {
                "round0_mbs": round(r0.bytes / r0.duration_s / 1e6),
                "round0_s": round(r0.duration_s, 2),
                **sampler.window(t0, t0 + r0.duration_s),
            }
    finally:
        dst.kill()
        dst.wait()


def raw(gib: int, streams: int) -> dict[str, object]:
    buf = GuestMemory(gib * GIB)
    try:
        pages = buf.pages()
        pages[8192:] = 1  # populated and non-zero; rawtcp does not look at the bytes
        view = buf.view(32 << 20, gib * GIB - (32 << 20))
        res = rawtcp.measure(view, streams)
        return {"mbs": round(view.nbytes / res.seconds / 1e6), "load": round(os.getloadavg()[0], 1)}
    finally:
        buf.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--verify", choices=("on", "strict", "off"), default="on")
    p.add_argument("--big", action="store_true", help="also the 4 GiB dirtying guest")
    p.add_argument("--only", choices=("paused", "dirtying"))
    args = p.parse_args()
    out: list[dict[str, object]] = []

    def show(case: dict[str, object]) -> None:
        out.append(case)
        print(json.dumps(case), flush=True)

    for rep in range(args.repeats):
        if args.only != "dirtying":
            for ch in (1, 2):
                show({"case": f"raw TCP {ch} stream(s)", "rep": rep, **raw(1, ch)})
                r = round0("paused", 1, ch, prealloc=True, verify=args.verify)
                show({"case": f"paused 1 GiB, {ch} ch, prealloc", "rep": rep, **r})
        if args.only != "paused":
            for gib in (1, 4) if args.big else (1,):
                for pre in (False, True):
                    r = round0("dirty", gib, 2, prealloc=pre, verify=args.verify)
                    dest = "prealloc" if pre else "fresh"
                    show({"case": f"dirtying {gib} GiB, 2 ch, {dest}", "rep": rep, **r})


if __name__ == "__main__":
    main()
