"""``vmferry bench devices``: what each DMA dirty-tracking mode costs a live migration.

dmatest keeps a dmaengine busy (DMA into guest memory behind the CPU's back) while the VM
is migrated between two in-process endpoints over loopback; each mode runs the same
workload, and every figure is reported against ``iommu`` mode measured in the same run.
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from typing import Any

from vmferry.machine import Machine, MachineConfig
from vmferry.migration.source import MigrationSource
from vmferry.testing.harness import InProcessDestination, migrate

MODES = ("iommu", "device", "none")
GUEST_ARGS = "seed=3 rounds=3000 rate=20000 bufs=256"  # 16 MiB of DMA buffers, ~10 s


@dataclass
class ModeResult:
    mode: str
    total_ms: list[float]
    downtime_ms: list[float]
    ram_bytes: list[int]
    device_bytes: list[int]
    dma_dirty_pages: list[int]
    rounds: list[int]

    def row(self, base: ModeResult) -> dict[str, Any]:
        med = statistics.median
        return {
            "mode": self.mode,
            "total-time-ms": med(self.total_ms),
            "downtime-ms": med(self.downtime_ms),
            "ram-bytes": med(self.ram_bytes),
            "device-bytes": med(self.device_bytes),
            "dma-dirty-pages": med(self.dma_dirty_pages),
            "rounds": med(self.rounds),
            "total-time-ratio": med(self.total_ms) / med(base.total_ms),
            "downtime-ratio": med(self.downtime_ms) / med(base.downtime_ms),
            "ram-bytes-ratio": med(self.ram_bytes) / max(med(base.ram_bytes), 1),
            "repeats": len(self.total_ms),
        }


def migrate_once(mode: str, memory_mib: int) -> MigrationSource:
    config = MachineConfig(
        memory=memory_mib << 20,
        image="dmatest",
        cmdline=GUEST_ARGS,
        devices=(f"dmaengine,dirty={mode}",),
    )
    src = Machine.boot(config, serial=io.BytesIO())
    try:
        with InProcessDestination() as destination:
            src.start()
            time.sleep(1.0)  # the ring is busy by now
            run = migrate(src, destination=destination, timeout_s=120)
            if run.stats.status != "completed":
                raise RuntimeError(f"{mode}: migration {run.stats.status}: {run.stats.error}")
            return run.source
    finally:
        src.close()


def run(repeats: int = 3, memory_mib: int = 256) -> list[dict[str, Any]]:
    results = {m: ModeResult(m, [], [], [], [], [], []) for m in MODES}
    for _ in range(repeats):
        for mode in MODES:  # interleaved, so drift on a noisy host hits every mode alike
            st = migrate_once(mode, memory_mib).stats
            r = results[mode]
            r.total_ms.append(st.total_ms)
            r.downtime_ms.append(st.downtime_ms)
            r.ram_bytes.append(st.transferred)
            r.device_bytes.append(st.device_transferred)
            r.dma_dirty_pages.append(sum(int(str(d["dma-dirty-pages"])) for d in st.devices))
            r.rounds.append(len(st.rounds))
    base = results["iommu"]
    return [results[m].row(base) for m in MODES]
