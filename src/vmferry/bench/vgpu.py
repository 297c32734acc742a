"""``vmferry bench vgpu``: downtime of a busy vGPU with VRAM pre-copy against stop-copy
only, at several VRAM shares, and what the command scanner costs per command.

gpujob keeps the vGPU busy (unpaced: fills, copies, blits, compute and fences over a
64 MiB working set) while the VM is migrated between two in-process endpoints over
loopback. Pre-copy streams the share while the guest runs and re-sends what the engine
dirtied; stop-copy only (the same device without PRE_COPY, ``precopy=off``) moves all of
it in the downtime, as vGPU vMotion did before device pre-copy. Stop-copy only cannot
meet any small downtime limit, so it runs with the limit lifted; pre-copy keeps QEMU's
300 ms default.
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmferry.devices.vgpu.device import Vgpu
from vmferry.devices.vgpu.ggtt import Ggtt
from vmferry.devices.vgpu.registers import COMPLETED
from vmferry.devices.vgpu.scanner import (
    CMD,
    COMPUTE_MATMUL,
    COMPUTE_REDUCE,
    OP_BLIT,
    OP_COMPUTE,
    OP_COPY,
    OP_FENCE,
    OP_FILL,
    scan,
)
from vmferry.machine import Machine, MachineConfig
from vmferry.memory import GuestMemory
from vmferry.migration.params import MAX_DOWNTIME_LIMIT_MS, MigrationParameters
from vmferry.testing.harness import InProcessDestination, migrate

SHARES_MIB = (256, 1024, 2048)
GUEST_ARGS = "seed=9 rounds=100000000 ws=64M"  # runs until the migration is over
GUEST_MEMORY = 256 << 20
WARM_COMMANDS = 2000  # into the job proper before migrating
GMIG_DOWNTIME_MS = 119.0  # gMig (VEE'18), GVT-g vGPU migration, Linux guest, average
TARGET_RATIO = 0.2


@dataclass
class Run:
    share_mib: int
    precopy: bool
    downtime_ms: float
    total_ms: float
    device_precopy_bytes: int
    device_stop_copy_bytes: int
    device_stop_copy_ms: float
    scan_ns_per_command: float
    commands: int


def migrate_once(share_mib: int, precopy: bool) -> Run:
    # Two instances of half a parent each: the source's and the destination's vGPU.
    spec = f"vgpu,type=vgpu-2,vram={2 * share_mib}M,precopy={'on' if precopy else 'off'}"
    config = MachineConfig(memory=GUEST_MEMORY, image="gpujob", cmdline=GUEST_ARGS, devices=(spec,))
    src = Machine.boot(config, serial=io.BytesIO())
    try:
        with InProcessDestination() as destination:
            src.start()
            dev = src.devices[0]
            assert isinstance(dev, Vgpu)
            deadline = time.monotonic() + 60
            while dev.mmio_read(COMPLETED, 8) < WARM_COMMANDS:
                if time.monotonic() > deadline or src.exit is not None:
                    raise RuntimeError(f"gpujob made no progress: {src.exit}")
                time.sleep(0.01)
            limit = 300 if precopy else MAX_DOWNTIME_LIMIT_MS
            params = MigrationParameters(downtime_limit_ms=limit)
            run = migrate(src, destination=destination, params=params, timeout_s=600)
            st = run.stats
            if st.status != "completed":
                raise RuntimeError(f"{share_mib} MiB: migration {st.status}: {st.error}")
            ds = run.source.devices.stats[0]
            report = dev.busy_report()
            return Run(
                share_mib,
                precopy,
                st.downtime_ms,
                st.total_ms,
                ds.precopy_bytes,
                ds.stop_copy_bytes,
                ds.stop_copy_ms,
                float(report["scan_ns_per_command"]),
                int(report["commands"]),
            )
    finally:
        src.close()


def scanner_cost(iterations: int = 2000) -> dict[str, float]:
    """µs per command for the scanner alone, by command, on a GGTT like gpujob's."""
    memory = GuestMemory(64 << 20)
    try:
        ggtt = Ggtt(1 << 18, 64 << 20, memory)
        pages = np.arange(16384, dtype=np.uint64)
        ggtt.load(pages.astype(np.int64), (pages << np.uint64(12)) | np.uint64(1))
        sys_va = 0x3000_0000
        sys = np.arange(2048, dtype=np.uint64)
        ggtt.load(
            np.concatenate([pages.astype(np.int64), (sys_va >> 12) + sys.astype(np.int64)]),
            np.concatenate(
                [
                    (pages << np.uint64(12)) | np.uint64(1),
                    ((sys + np.uint64(4096)) << np.uint64(12)) | np.uint64(3),
                ]
            ),
        )
        cmds = {
            "FILL 64 KiB": CMD.pack(OP_FILL, 0, 0x10000, 0x10000, 7, 0, 0, 0, 0),
            "COPY 64 KiB VRAM→RAM": CMD.pack(OP_COPY, 0, 0x20000, sys_va, 0x10000, 0, 0, 0, 0),
            "BLIT 64 rows": CMD.pack(OP_BLIT, 0, 0, 0x40000, 1024, 1024, 512, 64, 0),
            "REDUCE 64 KiB": CMD.pack(OP_COMPUTE, 0, COMPUTE_REDUCE, 0, 8192, sys_va, 0, 0, 0),
            "MATMUL 16³": CMD.pack(
                OP_COMPUTE, 0, COMPUTE_MATMUL, sys_va, sys_va + 0x4000, sys_va + 0x8000, 16, 16, 16
            ),
            "FENCE": CMD.pack(OP_FENCE, 0, sys_va + 0x10000, 1, 0, 0, 0, 0, 0),
        }
        out: dict[str, float] = {}
        for name, raw in cmds.items():
            t0 = time.perf_counter_ns()
            for _ in range(iterations):
                scan(raw, ggtt, 16)
            out[name] = (time.perf_counter_ns() - t0) / iterations / 1e3
        return out
    finally:
        memory.close()


def run(repeats: int = 1, shares: tuple[int, ...] = SHARES_MIB) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    med = statistics.median
    for share in shares:
        runs = {True: [], False: []}  # type: dict[bool, list[Run]]
        for _ in range(repeats):
            for precopy in (True, False):  # interleaved: drift hits both alike
                runs[precopy].append(migrate_once(share, precopy))
        pre, stop = runs[True], runs[False]
        rows.append(
            {
                "vram-share-mib": share,
                "precopy-downtime-ms": med(r.downtime_ms for r in pre),
                "stopcopy-downtime-ms": med(r.downtime_ms for r in stop),
                "downtime-ratio": med(r.downtime_ms for r in pre)
                / med(r.downtime_ms for r in stop),
                "precopy-device-state-ms": med(r.device_stop_copy_ms for r in pre),
                "stopcopy-device-state-ms": med(r.device_stop_copy_ms for r in stop),
                "precopy-total-ms": med(r.total_ms for r in pre),
                "stopcopy-total-ms": med(r.total_ms for r in stop),
                "precopy-device-stop-copy-bytes": med(r.device_stop_copy_bytes for r in pre),
                "stopcopy-device-stop-copy-bytes": med(r.device_stop_copy_bytes for r in stop),
                "precopy-device-precopy-bytes": med(r.device_precopy_bytes for r in pre),
                "scan-ns-per-command": med(r.scan_ns_per_command for r in pre + stop),
                "repeats": repeats,
            }
        )
    return {
        "rows": rows,
        "scanner-us-per-command": scanner_cost(),
        "target-ratio": TARGET_RATIO,
        "gmig-downtime-ms": GMIG_DOWNTIME_MS,
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables for docs/benchmarks.md."""
    lines = [
        "| VRAM share | downtime, pre-copy | downtime, stop-copy only | ratio (target ≤ 0.2) "
        "| vGPU state in the downtime, pre-copy | … stop-copy only "
        "| total time, pre-copy | total time, stop-copy only | device bytes in downtime, "
        "pre-copy | … stop-copy only |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['vram-share-mib']} MiB | {r['precopy-downtime-ms']:.0f} ms "
            f"| {r['stopcopy-downtime-ms']:.0f} ms | {r['downtime-ratio']:.3f} "
            f"| {r['precopy-device-state-ms']:.1f} ms | {r['stopcopy-device-state-ms']:.0f} ms "
            f"| {r['precopy-total-ms']:.0f} ms | {r['stopcopy-total-ms']:.0f} ms "
            f"| {r['precopy-device-stop-copy-bytes'] / 2**20:.1f} MiB "
            f"| {r['stopcopy-device-stop-copy-bytes'] / 2**20:.0f} MiB |"
        )
    lines += ["", "| command | scanner µs per command |", "|---|---|"]
    for name, us in result["scanner-us-per-command"].items():
        lines.append(f"| {name} | {us:.1f} |")
    return "\n".join(lines)


def verdicts(result: dict[str, Any]) -> list[str]:
    out = []
    for r in result["rows"]:
        ok = r["downtime-ratio"] <= TARGET_RATIO
        out.append(
            f"{r['vram-share-mib']} MiB: ratio {r['downtime-ratio']:.3f} "
            f"({'meets' if ok else 'misses'} ≤ {TARGET_RATIO})"
        )
        if r["vram-share-mib"] == 1024:
            d = r["precopy-downtime-ms"]
            out.append(
                f"1 GiB: downtime {d:.0f} ms with pre-copy, "
                f"{'below' if d < GMIG_DOWNTIME_MS else 'above'} gMig's {GMIG_DOWNTIME_MS:.0f} ms"
            )
    return out
