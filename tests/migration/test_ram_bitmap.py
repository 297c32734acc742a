"""RAM sections made from dirty bitmaps: per channel, in word batches, recorded by runs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.migration.ramload import load_ram
from vmferry.errors import StreamError
from vmferry.memory import DirtyBitmap, GuestMemory
from vmferry.migration import codec
from vmferry.migration.channel import CHANNEL_BLOCK_SHIFT, split_by_channel
from vmferry.migration.ram import MAX_BATCH_PAGES, MAX_SECTION_PAGES, Batch, RamReceiver, RamSender
from vmferry.migration.stream import StreamWriter
from vmferry.testing.transport import MemorySink

MEM = 8 << 20
NPAGES = MEM // 4096


def _memory(seed: int) -> GuestMemory:
    m = GuestMemory(MEM)
    m.pages()[:] = np.random.default_rng(seed).integers(1, 2**63, m.pages().shape, np.uint64)
    m.pages()[::97] = 0  # some zero pages, so runs are cut at them
    return m


pages_strategy = st.lists(
    st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 700)), min_size=1, max_size=30
).map(lambda rs: sorted({p for s, k in rs for p in range(s, min(s + k, NPAGES))}))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages_strategy, st.integers(1, 3), st.sampled_from([64, 128, 1000]))
def test_channels_of_a_bitmap_carry_exactly_its_pages(
    pages: list[int], channels: int, batch_pages: int
) -> None:
    src, dst = _memory(len(pages)), GuestMemory(MEM)
    try:
        dirty = DirtyBitmap.from_pages(NPAGES, np.array(pages, dtype=np.int64))
        written = DirtyBitmap(NPAGES)
        seen: list[Batch] = []
        for c, part in enumerate(split_by_channel(dirty, channels)):
            rx = RamReceiver(dst, written, c, channels)
            sink = MemorySink()
            w = StreamWriter(sink)
            w.section(codec.CONF, [b"{}"])
            sender = RamSender(w, src, batch_pages=batch_pages)
            sender.send(part, seen.append)
            for tag in (codec.CPUS, codec.DEVS, codec.END):
                w.section(tag, [b"{}"] if tag != codec.END else [])
            load_ram(bytes(sink.data), rx)
            # A batch's words hold this channel's pages only: re-arming them touches no other.
            for b in seen:
                got = b.dirty.pages(b.first_word, b.end_word)
                assert (((got >> CHANNEL_BLOCK_SHIFT) % channels) == c).all()
            seen_pages = np.concatenate(
                [np.zeros(0, np.int64)] + [b.dirty.pages(b.first_word, b.end_word) for b in seen]
            )
            assert all(b.npages < batch_pages + 64 for b in seen)
            assert sender.stats.normal + sender.stats.zero == part.count() == seen_pages.size
            seen.clear()
        p = np.array(pages, dtype=np.int64)
        assert np.array_equal(dst.pages()[p], src.pages()[p])
        others = np.setdiff1d(np.arange(NPAGES), p)
        assert not dst.pages()[others].any(), "a page not in the set was written"
        # The record holds every page that came with data (zero pages need not be written).
        nonzero = p[src.pages()[p].any(axis=1)]
        assert written.pages().tolist() == nonzero.tolist()
    finally:
        src.close()
        dst.close()


def test_a_page_list_and_its_bitmap_make_the_same_stream() -> None:
    src = _memory(3)
    try:
        pages = np.flatnonzero(np.random.default_rng(4).random(NPAGES) < 0.3)
        streams = []
        for what in (pages, DirtyBitmap.from_pages(NPAGES, pages)):
            sink = MemorySink()
            RamSender(StreamWriter(sink), src, batch_pages=256).send(what)
            streams.append(bytes(sink.data))
        assert streams[0] == streams[1]
    finally:
        src.close()


def _section(runs: list[tuple[int, int, int]]) -> bytes:
    """A stream of one RAM section with these (first, npages, flags) runs, data all ones."""
    table = np.array(runs, dtype=np.uint64).astype(np.int64)
    rec = np.zeros(len(runs), dtype=codec.RUN_DTYPE)
    rec["first"], rec["npages"], rec["flags"] = table[:, 0], table[:, 1], table[:, 2]
    ndata = sum(n for _, n, f in runs if not f & codec.RUN_ZERO)
    payload = codec.RAM_HEAD.pack(len(runs), 0) + rec.tobytes() + b"\xff" * (4096 * ndata)
    sink = MemorySink()
    w = StreamWriter(sink)
    w.section(codec.CONF, [b"{}"])
    w.section(codec.RAM, [payload])
    for tag in (codec.CPUS, codec.DEVS, codec.END):
        w.section(tag, [b"{}"] if tag != codec.END else [])
    return bytes(sink.data)


def test_zero_runs_may_claim_no_more_pages_than_a_batch_holds() -> None:
    """Zero runs cost 16 bytes each on the wire whatever they cover: 20000 of them over
    all of RAM once made the receiver build an index per claimed page (gigabytes)."""
    dst = GuestMemory(MEM)
    try:
        everything = [(0, NPAGES, codec.RUN_ZERO)] * 20000
        with pytest.raises(StreamError, match=r"section #1 RAM .* claim 40960000 pages"):
            load_ram(_section(everything), RamReceiver(dst))
        assert MAX_SECTION_PAGES == 32 * NPAGES - 1
        with pytest.raises(StreamError, match="claim 65536 pages"):
            load_ram(_section([(0, NPAGES, codec.RUN_ZERO)] * 32), RamReceiver(dst))
        most = [(0, NPAGES, codec.RUN_ZERO)] * 31 + [(1, NPAGES - 1, codec.RUN_ZERO)]
        load_ram(_section(most), RamReceiver(dst))  # as many as a batch holds
    finally:
        dst.close()


def test_a_sender_makes_no_batch_a_receiver_would_refuse() -> None:
    assert MAX_BATCH_PAGES + 63 <= MAX_SECTION_PAGES
    with pytest.raises(ValueError, match="batch_pages"):
        RamSender(StreamWriter(MemorySink()), GuestMemory(MEM), batch_pages=MAX_BATCH_PAGES + 1)


@pytest.mark.parametrize(
    ("first", "npages", "why"),
    [
        (512, 1, "not within a block of channel 0 of 2"),  # block 1: channel 1's
        (1020, 8, "not within a block of channel 0 of 2"),  # crosses into block 2
        (1024 + 511, 2, "not within a block of channel 0 of 2"),  # block 2 into 3
    ],
)
def test_a_channel_takes_only_runs_within_its_own_blocks(first: int, npages: int, why: str) -> None:
    """Channels share one written bitmap, word by word: a run of another channel's block,
    or crossing a block, could race with that channel's updates and lose a bit."""
    dst = GuestMemory(MEM)
    try:
        for flags in (0, codec.RUN_ZERO):
            with pytest.raises(StreamError, match=why):
                load_ram(_section([(first, npages, flags)]), RamReceiver(dst, None, 0, 2))
        load_ram(_section([(1024, 512, 0)]), RamReceiver(dst, None, 0, 2))  # its own block
        load_ram(_section([(512, 1, 0)]), RamReceiver(dst, None, 1, 2))
        load_ram(_section([(512, 8, 0)]), RamReceiver(dst))  # one channel: anything goes
    finally:
        dst.close()
