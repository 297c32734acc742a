"""``vmferry bench bookkeeping``: what one pre-copy round spends on dirty-set bookkeeping.

A real KVM VM with one 16 GiB memslot (RAM never touched, so it costs the host nothing)
and dirty logging on. Per round and dirty share, each phase timed on its own:

- fetch: ``Machine.fetch_dirty_log`` (KVM_GET_DIRTY_LOG into the round's bitmap).
- clear: the KVM_CLEAR_DIRTY_LOG calls for what is sent, batch by batch per channel, as the
  engine makes them just before each batch is read.
- split: from the round's bitmap to each batch's run table, per channel (what the sender
  does before it reads guest memory; reading memory and the zero-page check are not timed).
- record: the destination marking the pages each batch wrote.
- verify: what verification reads back from that record (once per migration, not per round).

The guest cannot dirty 16 GiB on this host, so after the ioctl the bench ORs in the round's
pattern (pages drawn uniformly at random: the worst case for runs) the way a fetch would
return it. KVM's own work per dirty page (write-protecting it again) is not in these figures:
untouched pages have nothing to protect. Median of ``--repeats`` rounds, ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from vmferry.bench.table import print_rows
from vmferry.machine import Machine, MachineConfig
from vmferry.memory import PAGE_SIZE, DirtyBitmap
from vmferry.migration.channel import split_by_channel
from vmferry.migration.ram import DEFAULT_BATCH_PAGES, Batch, batch_runs
from vmferry.migration.verify import written_outside

GUEST = 16 << 30
SHARES = (0.01, 0.10, 1.0)
CHANNELS = 2  # QEMU's default multifd-channels
PHASES = ("fetch", "clear", "split", "record", "verify")
COLUMNS = ("dirty", "pages", *(f"{p}-ms" for p in PHASES), "round-ms")


def add_parser(which: Any) -> None:
    p = which.add_parser(
        "bookkeeping",
        help="per-round dirty-set bookkeeping on a 16 GiB guest: fetch, clear, split, record",
        description="Time what one pre-copy round spends turning KVM's dirty log into what "
        "is sent and what the destination records, on a KVM VM with a 16 GiB memslot at 1 %%, "
        "10 %% and 100 %% of its pages dirty (pattern ORed in after KVM_GET_DIRTY_LOG; the "
        "RAM itself is never touched). About a minute.",
    )
    p.add_argument("--repeats", type=int, default=5, help="rounds per share (median)")
    p.add_argument("--channels", type=int, default=CHANNELS, help="multifd channels")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench_bookkeeping)


def _pattern(npages: int, share: float, rng: np.random.Generator) -> npt.NDArray[np.uint64]:
    """Bitmap words with ``share`` of the pages set, uniformly at random."""
    if share >= 1.0:
        bm = DirtyBitmap(npages)
        bm.set_all()
        return bm.words.copy()
    bits = rng.random(npages) < share
    return np.packbits(bits, bitorder="little").view(np.uint64).copy()


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def one_round(
    m: Machine, pattern: npt.NDArray[np.uint64], channels: int, resident: npt.NDArray[np.int64]
) -> dict[str, float]:
    """One round's bookkeeping, phase by phase, as the engine does it (ms each)."""
    npages = m.memory.npages
    dirty = DirtyBitmap(npages)
    out: dict[str, float] = {}

    def fetch() -> None:
        m.fetch_dirty_log(dirty)
        np.bitwise_or(dirty.words, pattern, out=dirty.words)  # what the guest dirtied

    out["fetch"] = _timed(fetch)
    # The sender's batches, per channel: kept to replay the clears and the receiver on.
    batches: list[Batch] = []
    tables: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []

    def split() -> None:
        for part in split_by_channel(dirty, channels):
            for first, end in part.batches(DEFAULT_BATCH_PAGES):
                batch = Batch(part, first, end, part.count(first, end))
                batches.append(batch)
                starts, lengths, _ = batch_runs(batch)  # the pages: for the zero-page check
                tables.append((starts, lengths))

    out["split"] = _timed(split)

    def clear() -> None:
        for b in batches:
            m.clear_dirty_log(b.dirty, b.first_page, b.page_span)

    out["clear"] = _timed(clear)
    written = DirtyBitmap(npages)

    def record() -> None:
        for starts, lengths in tables:
            written.set_runs(starts, lengths)

    out["record"] = _timed(record)

    def verify() -> None:
        written_outside(written, resident)

    out["verify"] = _timed(verify)
    return out


def run(repeats: int, channels: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(9)
    rows = []
    with Machine(MachineConfig(memory=GUEST)) as m:
        m.set_dirty_logging(True)
        npages = m.memory.npages
        resident = np.arange(npages, dtype=np.int64)  # a guest whose RAM all holds data
        for share in SHARES:
            pattern = _pattern(npages, share, rng)
            rounds = [one_round(m, pattern, channels, resident) for _ in range(repeats)]
            row: dict[str, Any] = {
                "dirty": f"{share:.0%}",
                "pages": int(np.bitwise_count(pattern).sum()),
            }
            for p in PHASES:
                row[f"{p}-ms"] = statistics.median(r[p] for r in rounds)
            row["round-ms"] = statistics.median(
                sum(r[p] for p in PHASES if p != "verify") for r in rounds
            )
            rows.append(row)
    return rows


def cmd_bench_bookkeeping(args: argparse.Namespace) -> int:
    rows = run(args.repeats, args.channels)
    print_rows(
        f"vmferry bench bookkeeping: {GUEST >> 30} GiB guest ({GUEST // PAGE_SIZE:,} pages), "
        f"{args.channels} channels, batches of {DEFAULT_BATCH_PAGES} pages, median of "
        f"{args.repeats} rounds (round = fetch + clear + split + record; verify once)",
        COLUMNS,
        rows,
        args.json,
    )
    return 0
