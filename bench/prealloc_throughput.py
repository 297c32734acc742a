"""Round-0 RAM throughput of a 1 GiB migration into a destination process with and without
``--prealloc``, next to raw loopback TCP measured in the same run.

Run: ``.venv/bin/python bench/prealloc_throughput.py`` (about a minute). The guest is
booted and never run; RAM above 32 MiB holds random data (incompressible, no zero pages).
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np

from vmferry.bench import rawtcp
from vmferry.machine import Machine, MachineConfig
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource

GIB = 1 << 30
PORT = 47311


def migrate(channels: int, prealloc: bool) -> float:
    """Round 0's rate in bytes/s."""
    extra = ["--prealloc", "1G"] if prealloc else []
    dst = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmferry.cli.main",
            "run",
            "--incoming",
            f"tcp:127.0.0.1:{PORT}",
            "--timeout",
            "5",
            *extra,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        assert dst.stderr is not None
        dst.stderr.readline()  # "waiting for a migration on …": it listens
        config = MachineConfig(memory=GIB, image="memtouch", cmdline="wss=1M rate=1")
        with Machine.boot(config, serial=io.BytesIO()) as m:
            pages = m.memory.pages()
            pages[8192:] = np.random.default_rng(1).integers(
                0, 2**63, size=pages[8192:].shape, dtype=np.uint64
            )
            m.start(paused=True)
            mig = MigrationSource(
                m,
                f"tcp:127.0.0.1:{PORT}",
                MigrationParameters(multifd_channels=channels),
                MigrationCapabilities(multifd=channels > 1, x_verify=False),
            )
            mig.start()
            mig.wait(60)
            assert mig.stats.status == "completed", mig.stats.error
            r0 = mig.stats.rounds[0]
            return r0.bytes / r0.duration_s
    finally:
        dst.kill()
        dst.wait()


def main() -> None:
    from vmferry.memory import GuestMemory

    buf = GuestMemory(GIB)
    buf.bytes[:] = np.random.default_rng(2).integers(0, 255, size=GIB, dtype=np.uint8)
    view = buf.view(32 << 20, GIB - (32 << 20))
    for channels in (1, 2):
        raw = max(view.nbytes / rawtcp.measure(view, channels).seconds for _ in range(2))
        fresh = max(migrate(channels, False) for _ in range(2))
        pre = max(migrate(channels, True) for _ in range(2))
        print(
            f"{channels} channel(s): raw TCP {raw / 1e6:,.0f} MB/s; vmferry round 0 "
            f"{fresh / 1e6:,.0f} MB/s ({fresh / raw:.2f}×) into fresh memory, "
            f"{pre / 1e6:,.0f} MB/s ({pre / raw:.2f}×) with --prealloc"
        )


if __name__ == "__main__":
    main()
