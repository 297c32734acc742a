"""VMM benchmarks: how fast a guest dirties memory, save/restore of a full guest, bitmap scans.

Every number comes with a baseline measured in the same run on the same host, and the ratio
value ÷ baseline, so it can be read without knowing the host. What each baseline is, and
what is (not) in the page cache, is written next to the number rather than assumed.
"""

from __future__ import annotations

import ctypes
import io
import math
import mmap
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vmferry.errors import VmferryError
from vmferry.machine import Machine, MachineConfig
from vmferry.memory import PAGE_SIZE, DirtyBitmap, GuestMemory, page_runs
from vmferry.migration.ram import RamStats
from vmferry.migration.snapshot import load_from_file, save_to_file

MB = 1e6  # rates are in MB/s of 10^6 bytes, as memtouch's rate= is
WSS_BASE = 16 << 20  # memtouch lays its working set from 16 MiB (docs/guest-abi.md)
SUBPROCESS_TIMEOUT_S = 600

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Measurement:
    section: str
    what: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    note: str = ""

    @property
    def ratio(self) -> float:
        """value ÷ baseline: for a rate, the share of the baseline's speed; for a time, × slower."""
        return self.value / self.baseline_value

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass(frozen=True)
class BenchPlan:
    """Sizes of one run. FULL fits in ~3 minutes on 2 cores; QUICK is a smoke run."""

    dirty_wss: int
    dirty_vcpus: tuple[int, ...]
    dirty_patterns: tuple[str, ...]
    sample_s: float
    sample_every_s: float
    save_memory: int
    scan_memory: int
    scan_densities: tuple[float, ...]
    repeat: int


FULL = BenchPlan(
    dirty_wss=512 << 20,
    dirty_vcpus=(1, 2),
    dirty_patterns=("seq", "random"),
    sample_s=2.0,
    sample_every_s=0.1,
    save_memory=4 << 30,
    scan_memory=16 << 30,
    scan_densities=(1.0, 0.01, 0.0001),
    repeat=7,
)
QUICK = BenchPlan(
    dirty_wss=64 << 20,
    dirty_vcpus=(1,),
    dirty_patterns=("seq",),
    sample_s=0.5,
    sample_every_s=0.1,
    save_memory=256 << 20,
    scan_memory=1 << 30,
    scan_densities=(0.01,),
    repeat=3,
)


def _gib(n: int) -> str:
    return f"{n / 2**30:g} GiB"


def _best_of(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` runs: the least disturbed by the rest of the host."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- a) guest dirtying rate -------------------------------------------------------------


def _memtouch(memory: int, vcpus: int, cmdline: str) -> Machine:
    """memtouch over pre-populated RAM, so first-touch allocation is in none of the numbers."""
    ram = GuestMemory(memory)
    try:
        ram.populate()
        config = MachineConfig(memory=memory, vcpus=vcpus, image="memtouch", cmdline=cmdline)
        return Machine.boot(config, serial=io.BytesIO(), memory=ram)
    except BaseException:
        ram.close()  # idempotent: the machine may already have closed it
        raise


def _run_seconds(memory: int, vcpus: int, cmdline: str) -> float:
    with _memtouch(memory, vcpus, cmdline) as m:
        t0 = time.perf_counter()
        m.start()
        result = m.wait(120)
        dt = time.perf_counter() - t0
    if result is None or result.code != 0:
        raise VmferryError(f"memtouch {cmdline} did not finish cleanly: {result}")
    return dt


def guest_write_rate(memory: int, vcpus: int, wss: int, params: str) -> float:
    """MB/s the guest rewrites its working set at with dirty logging off.

    From run times: (t(1 + k rounds) - t(1 round)) / (k · wss). The difference cancels
    boot, round 0 and the final read-back, which a plain rounds·wss/elapsed would count.
    k grows until the difference is at least a second, so timer noise stays small.
    """

    def run(rounds: int) -> float:
        # the faster of two runs: the one less disturbed by the rest of the host
        return min(_run_seconds(memory, vcpus, f"{params} rounds={rounds}") for _ in range(2))

    t1 = run(1)
    k = 4
    dt = run(1 + k) - t1
    while dt < 1.0 and k < 4096:
        k = min(4096, max(2 * k, math.ceil(k * 1.3 / max(dt, 0.05))))
        dt = run(1 + k) - t1
    return k * wss / MB / dt


def dirty_log_rate(memory: int, vcpus: int, params: str, plan: BenchPlan) -> tuple[float, int]:
    """MB/s of distinct pages the guest dirties with logging on: (rate, samples).

    Every ``sample_every_s`` the log is fetched and those pages re-protected (cleared), as a
    migration's copy loop would; the sum of pages per interval over the sampling time.
    """
    # rounds so large that the guest cannot finish while sampled
    with _memtouch(memory, vcpus, f"{params} rounds=1000000") as m:
        m.set_dirty_logging(True)
        log = DirtyBitmap(m.memory.npages)
        m.start()
        time.sleep(plan.sample_every_s)  # let it boot: set-up is not part of the rate
        m.fetch_dirty_log(log)
        m.clear_dirty_log(log)
        pages = samples = 0
        t0 = t = time.perf_counter()
        while t - t0 < plan.sample_s:
            time.sleep(plan.sample_every_s)
            log.clear()
            m.fetch_dirty_log(log)
            m.clear_dirty_log(log)
            t = time.perf_counter()
            pages += log.count()
            samples += 1
        if m.exit is not None:
            raise VmferryError(f"memtouch ended while being sampled: {m.exit}")
    return pages * PAGE_SIZE / MB / (t - t0), samples


def bench_dirty_rate(plan: BenchPlan, progress: Progress) -> list[Measurement]:
    out = []
    wss = plan.dirty_wss
    memory = WSS_BASE + wss + (16 << 20)  # room for the image below the working set
    for vcpus in plan.dirty_vcpus:
        for pattern in plan.dirty_patterns:
            params = f"wss={wss} pattern={pattern} seed=1 rate=0"
            progress(f"dirty rate: memtouch {vcpus} vCPU {pattern}")
            rate, samples = dirty_log_rate(memory, vcpus, params, plan)
            base = guest_write_rate(memory, vcpus, wss, params)
            out.append(
                Measurement(
                    "a) dirtying rate",
                    f"memtouch {vcpus} vCPU {pattern}: distinct pages dirtied",
                    rate,
                    "MB/s",
                    "same guest, dirty log off (run time)",
                    base,
                    f"wss {wss >> 20} MiB, {samples} samples of {plan.sample_every_s * 1e3:.0f} ms",
                )
            )
    return out


# ---- b) save and restore of a full guest -----------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore; mapping faults nothing in).

    A libc mapping rather than Python's mmap, whose address can only be had by exporting a
    buffer (and only a writable one through ctypes).
    """
    size = path.stat().st_size
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = np.zeros((size + PAGE_SIZE - 1) // PAGE_SIZE, dtype=np.uint8)
            if _libc.mincore(addr, size, vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return float(np.count_nonzero(vec & 1)) / vec.size


def drop_from_cache(path: Path) -> float:
    """Write back and evict this one file's pages (not the whole host's cache); what's left."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)  # DONTNEED only drops clean pages
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return cached_fraction(path)


def fill_random(memory: GuestMemory, start: int, seed: int = 1) -> None:
    """Incompressible, deterministic data in every page from ``start`` up.

    One random 64 MiB block XORed with a per-chunk key: no two pages alike, and one numpy
    operation per chunk rather than random generation of all of RAM.
    """
    chunk = 64 << 20
    block = np.frombuffer(np.random.default_rng(seed).bytes(chunk), dtype=np.uint64)
    words = memory.bytes.view(np.uint64)
    for i, off in enumerate(range(start, memory.size, chunk)):
        n = min(chunk, memory.size - off) // 8
        key = np.uint64((0x9E3779B97F4A7C15 * (i + 1)) & (2**64 - 1))
        np.bitwise_xor(block[:n], key, out=words[off // 8 : off // 8 + n])


def _sample_pages(memory: GuestMemory) -> npt.NDArray[np.uint64]:
    """Every 4096th page (one per 16 MiB), copied: a cheap check that restore got it all."""
    return memory.pages()[::4096].copy()


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, timeout=SUBPROCESS_TIMEOUT_S)
    return time.perf_counter() - t0


def _shm_dir(size: int, fallback: Path) -> Path:
    """tmpfs is shmem, the memory guest RAM's memfd is made of: the fair target for a copy."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > size + (256 << 20):
        return shm
    return fallback


def _save_filled(
    size: int, saved: Path, progress: Progress
) -> tuple[npt.NDArray[np.uint64], RamStats, float]:
    """Save a filled guest of ``size`` to ``saved``: a sample of its pages, what was
    saved, the seconds save_to_file took."""
    progress(f"save/restore: filling a {_gib(size)} guest from the host")
    # The guest is booted (image, boot info, vCPU state) but never runs: RAM above 16 MiB
    # is filled from the host instead, which is deterministic and as incompressible as a
    # guest's data gets; a guest filling 4 GiB itself would take longer and vary.
    config = MachineConfig(memory=size, vcpus=1, image="memtouch", cmdline="rounds=1")
    with Machine.boot(config, serial=io.BytesIO()) as m:
        fill_random(m.memory, WSS_BASE)
        m.start(paused=True)
        m.pause()
        probe = _sample_pages(m.memory)
        progress("save/restore: save_to_file")
        t0 = time.perf_counter()
        stats = save_to_file(m, str(saved))
        return probe, stats, time.perf_counter() - t0


def bench_save_restore(plan: BenchPlan, workdir: Path, progress: Progress) -> list[Measurement]:
    size = plan.save_memory
    if shutil.disk_usage(workdir).free < 2 * size + (1 << 30):
        raise VmferryError(
            f"{workdir} needs {2 * size + (1 << 30)} bytes free for the save "
            "benchmark; pick another --dir"
        )
    tag = f"vmferry-bench-{os.getpid()}"
    saved, disk_copy = workdir / f"{tag}.state", workdir / f"{tag}.copy"
    shm_copy = _shm_dir(size, workdir) / f"{tag}.shm"
    try:
        probe, stats, t_save = _save_filled(size, saved, progress)
        file_size = saved.stat().st_size
        cached_after_save = cached_fraction(saved)

        left = drop_from_cache(saved)
        progress("save/restore: load_from_file + Machine.from_state")
        t0 = time.perf_counter()
        snap = load_from_file(str(saved))
        with Machine.from_state(snap.state, snap.memory, serial=io.BytesIO()) as restored:
            t_restore = time.perf_counter() - t0
            if not np.array_equal(_sample_pages(restored.memory), probe):
                raise VmferryError("restored memory differs from what was saved")

        progress("save/restore: cp baselines")
        left_cp = drop_from_cache(saved)
        t_cp_in = _timed(["cp", "--reflink=never", str(saved), str(shm_copy)])
        # memory -> file on disk, made durable as save_to_file's fsync does
        t_cp_out = _timed(["cp", "--reflink=never", str(shm_copy), str(disk_copy)])
        t_cp_out += _timed(["sync", str(disk_copy)])
    finally:
        for p in (saved, disk_copy, shm_copy, Path(f"{saved}.partial")):
            p.unlink(missing_ok=True)
    where = f"{shm_copy.parent}"
    return [
        Measurement(
            "b) save/restore",
            f"save_to_file, {_gib(size)} guest, {file_size / 2**30:.2f} GiB",
            t_save,
            "s",
            f"cp {where} -> disk file, then sync",
            t_cp_out,
            f"{stats.normal} pages + {stats.zero} zero; RAM -> file, fsync; file "
            f"{cached_after_save:.0%} cached after",
        ),
        Measurement(
            "b) save/restore",
            "load_from_file + Machine.from_state",
            t_restore,
            "s",
            f"cp disk file -> {where}",
            t_cp_in,
            f"file {left:.0%} cached before restore, {left_cp:.0%} before cp "
            "(POSIX_FADV_DONTNEED; the host's cache of the virtual disk is not controlled)",
        ),
    ]


# ---- c) scanning a big guest's dirty bitmap ----------------------------------------------


def _bitmap(npages: int, density: float, rng: np.random.Generator) -> DirtyBitmap:
    bm = DirtyBitmap(npages)
    if density >= 1.0:
        bm.set_all()
    else:
        bm.set_pages(rng.choice(npages, size=max(1, int(npages * density)), replace=False))
    return bm


def bench_bitmap_scan(plan: BenchPlan, progress: Progress) -> list[Measurement]:
    size = plan.scan_memory
    npages = size // PAGE_SIZE
    rng = np.random.default_rng(1)
    scratch = np.empty((npages + 63) // 64, dtype=np.uint64)
    out = []
    for density in plan.scan_densities:
        progress(f"bitmap scan: {_gib(size)}, {density:.2%} set")
        bm = _bitmap(npages, density, rng)
        memcpy = _best_of(partial(np.copyto, scratch, bm.words), plan.repeat)
        pages = bm.pages()
        base = f"numpy copy of the {bm.words.nbytes >> 10} KiB bitmap"
        ops: list[tuple[str, Callable[[], object]]] = [
            ("count()", bm.count),
            ("pages()", bm.pages),
            ("page_runs(pages())", partial(page_runs, pages)),
        ]
        for what, fn in ops:
            t = _best_of(fn, plan.repeat)
            out.append(
                Measurement(
                    "c) bitmap scan",
                    f"{what}, {_gib(size)}, {density:.2%} set",
                    t * 1e3,
                    "ms",
                    base,
                    memcpy * 1e3,
                    f"{pages.size} pages set",
                )
            )

    progress(f"bitmap scan: KVM dirty log of an untouched {_gib(size)} machine")
    with Machine(MachineConfig(memory=size)) as m:
        m.set_dirty_logging(True)
        log = DirtyBitmap(m.memory.npages)
        memcpy = _best_of(lambda: np.copyto(scratch, log.words), plan.repeat)
        t_fetch = _best_of(lambda: m.fetch_dirty_log(log), plan.repeat)
        log.set_all()
        t_clear = _best_of(lambda: m.clear_dirty_log(log), plan.repeat)
    base = f"numpy copy of the {log.words.nbytes >> 10} KiB bitmap"
    return [
        *out,
        Measurement(
            "c) bitmap scan",
            f"Machine.fetch_dirty_log, {_gib(size)}",
            t_fetch * 1e3,
            "ms",
            base,
            memcpy * 1e3,
            "KVM_GET_DIRTY_LOG, RAM untouched, log on",
        ),
        Measurement(
            "c) bitmap scan",
            f"Machine.clear_dirty_log, {_gib(size)}, all set",
            t_clear * 1e3,
            "ms",
            base,
            memcpy * 1e3,
            "KVM_CLEAR_DIRTY_LOG of every page, RAM untouched",
        ),
    ]


# ---- the whole run ------------------------------------------------------------------------


def host_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def run_all(plan: BenchPlan, workdir: Path, progress: Progress) -> list[Measurement]:
    return [
        *bench_dirty_rate(plan, progress),
        *bench_save_restore(plan, workdir, progress),
        *bench_bitmap_scan(plan, progress),
    ]
