"""Set-up time and round-0 RAM throughput of a migration into a destination process, into
fresh memory (the destination pre-faults it ahead of the data: memory/populate.py) and
with ``--prealloc``, next to raw loopback TCP measured in the same run.

Run: ``.venv/bin/python bench/prealloc_throughput.py [--size GIB] [--reps N]`` (1 GiB,
fastest of 2: about a minute; ``--size 8`` needs twice 8 GiB free). The guest is booted
and never run; RAM above 32 MiB holds data (no zero pages), verification is off. Figures
per run: the source's ``setup-time`` (start to dirty tracking on, the destination's
"accepted" inside it) and round 0's rate; the destination's CPU seconds during the
migration.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from vmferry.bench import rawtcp
from vmferry.machine import Machine, MachineConfig
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource

GIB = 1 << 30
PORT = 47311


@dataclass(frozen=True)
class Run:
    setup_ms: float
    round0: float  # bytes/s
    dst_cpu_s: float


def _cpu_s(pid: int) -> float:
    """utime + stime of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def migrate(machine: Machine, channels: int, prealloc: bool) -> Run:
    extra = ["--prealloc", f"{machine.memory.size >> 20}M"] if prealloc else []
    dst = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmferry.cli.main",
            "run",
            "--incoming",
            f"tcp:127.0.0.1:{PORT}",
            "--timeout",
            "120",
            *extra,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        assert dst.stderr is not None
        dst.stderr.readline()  # "waiting for a migration on …": it listens (pre-allocated)
        cpu0 = _cpu_s(dst.pid)
        mig = MigrationSource(
            machine,
            f"tcp:127.0.0.1:{PORT}",
            MigrationParameters(multifd_channels=channels),
            MigrationCapabilities(multifd=channels > 1, x_verify=False),
        )
        mig.start()
        mig.wait(300)
        assert mig.stats.status == "completed", mig.stats.error
        cpu = _cpu_s(dst.pid) - cpu0
        r0 = mig.stats.rounds[0]
        return Run(mig.stats.setup_ms, r0.bytes / r0.duration_s, cpu)
    finally:
        dst.kill()
        dst.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1, help="guest RAM in GiB (default 1)")
    ap.add_argument("--reps", type=int, default=2, help="runs of each case (default 2)")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw TCP baseline")
    args = ap.parse_args()
    size = args.size * GIB
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    raws: dict[int, float] = {}
    if not args.no_raw:
        from vmferry.memory import GuestMemory

        buf = GuestMemory(GIB)
        buf.bytes[:] = np.random.default_rng(2).integers(0, 255, size=GIB, dtype=np.uint8)
        view = buf.view(32 << 20, GIB - (32 << 20))
        for channels in (1, 2):
            raws[channels] = max(
                view.nbytes / rawtcp.measure(view, channels).seconds for _ in range(2)
            )
        buf.close()
    config = MachineConfig(memory=size, image="memtouch", cmdline="wss=1M rate=1")
    with Machine.boot(config, serial=io.BytesIO()) as m:
        pages = m.memory.pages()
        # Distinct non-zero pages, written fast (no compression, so content is irrelevant).
        pages[8192:, :] = 0x0123456789ABCDEF
        pages[8192:, 0] = np.arange(1, pages.shape[0] - 8192 + 1, dtype=np.uint64)
        m.start(paused=True)
        for channels in (1, 2):
            for prealloc in (False, True):
                runs = [migrate(m, channels, prealloc) for _ in range(args.reps)]
                best = max(runs, key=lambda r: r.round0)
                raw = raws.get(channels)
                ratio = f" ({best.round0 / raw:.2f}× raw TCP {raw / 1e6:,.0f})" if raw else ""
                what = "--prealloc" if prealloc else "fresh memory"
                setups = ", ".join(f"{r.setup_ms:.0f}" for r in runs)
                rates = ", ".join(f"{r.round0 / 1e6:,.0f}" for r in runs)
                cpus = ", ".join(f"{r.dst_cpu_s:.2f}" for r in runs)
                print(
                    f"{args.size} GiB, {channels} channel(s), {what}: setup-time {setups} ms; "
                    f"round 0 {rates} MB/s, best {best.round0 / 1e6:,.0f}{ratio}; "
                    f"destination CPU {cpus} s"
                )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
