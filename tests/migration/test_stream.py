"""The stream on its own: RAM sections round-trip, and every kind of damage is named."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.migration.ramload import load_ram
from vmferry.errors import StreamError
from vmferry.machine.config import MachineConfig
from vmferry.memory import GuestMemory
from vmferry.migration import codec
from vmferry.migration.codec import DEVD_HEAD
from vmferry.migration.devices import DestinationDevices
from vmferry.migration.loader import load_stream, read_head
from vmferry.migration.ram import RamReceiver, RamSender, send_pages
from vmferry.migration.stream import StreamReader, StreamWriter
from vmferry.migration.transport import FdSink, FdSource
from vmferry.testing.transport import MemorySink, MemorySource

MEM = 32 << 20


def filled_memory(seed: int) -> GuestMemory:
    m = GuestMemory(MEM)
    rng = np.random.default_rng(seed)
    pages = m.pages()
    touched = rng.choice(m.npages, 600, replace=False)
    pages[touched] = rng.integers(0, 2**63, size=(600, 512), dtype=np.uint64)
    pages[touched[:50]] = 0  # resident but zero
    return m


def encode(m: GuestMemory, pages: np.ndarray) -> bytes:
    sink = MemorySink()
    w = StreamWriter(sink)
    w.section(codec.CONF, [b"{}"])
    send_pages(w, m, pages, batch_pages=128)
    w.section(codec.CPUS, [b"{}"])
    w.section(codec.DEVS, [b"[]"])
    w.section(codec.END, [])
    return bytes(sink.data)


def decode(data: bytes, dest: GuestMemory) -> RamReceiver:
    return load_ram(data, RamReceiver(dest))


@pytest.mark.parametrize("dense", [True, False])
def test_ram_round_trip_is_exact(dense: bool) -> None:
    src, dst = filled_memory(1), GuestMemory(MEM)
    try:
        pages = np.arange(src.npages) if dense else src.resident_pages()
        rx = decode(encode(src, pages), dst)
        assert np.array_equal(src.pages(), dst.pages())
        assert rx.stats.normal == 550 and rx.stats.zero == pages.size - 550
    finally:
        src.close()
        dst.close()


def test_a_page_that_became_zero_is_zeroed_on_the_destination() -> None:
    src, dst = filled_memory(2), GuestMemory(MEM)
    try:
        decode(encode(src, src.resident_pages()), dst)
        p = int(src.resident_pages()[-1])
        src.pages()[p] = 0
        decode(encode(src, np.array([p])), dst)
        assert not dst.pages()[p].any()
    finally:
        src.close()
        dst.close()


def test_fd_transport_round_trip(tmp_path: object) -> None:
    src, dst = filled_memory(3), GuestMemory(MEM)
    r, w = os.pipe2(os.O_CLOEXEC)
    data = encode(src, src.resident_pages())
    try:
        pid = os.fork()
        if pid == 0:  # the writer, in another process, as over a socket
            os.close(r)
            FdSink(w).write([data])
            os._exit(0)
        os.close(w)
        reader = StreamReader(FdSource(r))
        rx = RamReceiver(dst)
        while (hs := reader.next_section())[0].tag != codec.END:
            if hs[0].tag == codec.RAM:
                rx.load(reader, *hs)
            else:
                reader.read_payload(*hs)
        os.waitpid(pid, 0)
        assert np.array_equal(src.pages(), dst.pages())
    finally:
        os.close(r)
        src.close()
        dst.close()


@pytest.fixture(scope="module")
def valid_stream() -> bytes:
    m = filled_memory(4)
    try:
        return encode(m, m.resident_pages()[:300])
    finally:
        m.close()


def test_wrong_magic(valid_stream: bytes) -> None:
    with pytest.raises(StreamError, match="not a vmferry stream"):
        decode(b"QEVM" + valid_stream[4:], GuestMemory(MEM))


def test_newer_version(valid_stream: bytes) -> None:
    import struct

    import xxhash

    head = struct.pack("<8sII", codec.MAGIC, codec.VERSION + 1, 0)
    data = head + struct.pack("<Q", xxhash.xxh64_intdigest(head)) + valid_stream[24:]
    with pytest.raises(StreamError, match=r"version 4 is newer than this vmferry's \(3\)"):
        decode(data, GuestMemory(MEM))


def test_truncated(valid_stream: bytes) -> None:
    with pytest.raises(StreamError, match=r"truncated|ends before section"):
        decode(valid_stream[: len(valid_stream) // 2], GuestMemory(MEM))


def test_bit_flip_in_page_data_is_caught_by_the_checksum(valid_stream: bytes) -> None:
    data = bytearray(valid_stream)
    data[len(data) // 2] ^= 0x10
    with pytest.raises(StreamError, match=r"section #\d+ RAM at byte \d+: checksum mismatch"):
        decode(bytes(data), GuestMemory(MEM))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_damage_is_always_a_stream_error(valid_stream: bytes, data: st.DataObject) -> None:
    damaged = bytearray(valid_stream)
    # Distinct positions: two flips of one byte could cancel out.
    for pos in data.draw(st.sets(st.integers(0, len(damaged) - 1), min_size=1, max_size=4)):
        damaged[pos] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    dst = GuestMemory(MEM)
    try:
        with pytest.raises(StreamError):
            decode(bytes(damaged[:cut] if data.draw(st.booleans()) else damaged), dst)
    finally:
        dst.close()


# ---- sealed streams (files): every byte under a checksum


class GuestWritesDuringSend(MemorySink):
    """A sink during whose first RAM write the 'guest' rewrites every page it holds:
    what a running guest may do between the sender's checksum and the kernel's copy."""

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__()
        self.memory = memory
        self.wrote = False

    def write(self, bufs: object) -> None:
        assert isinstance(bufs, list)  # StreamWriter passes a list: header, then payload
        if not self.wrote and bytes(bufs[0][:4]) == codec.RAM:
            self.memory.pages()[:] ^= np.uint64(0x5A5A)
            self.wrote = True
        super().write(bufs)


def encode_live(m: GuestMemory, pages: np.ndarray, *, sealed: bool, sink: MemorySink) -> bytes:
    w = StreamWriter(sink)
    w.section(codec.CONF, [b"{}"])
    RamSender(w, m, batch_pages=128, sealed=sealed).send(pages, live=True)
    w.section(codec.CPUS, [b"{}"])
    w.section(codec.DEVS, [b"[]"])
    w.section(codec.END, [])
    return bytes(sink.data)


def ram_sections(data: bytes) -> list[tuple[int, int, int]]:
    """(flags, start of page data, end) of each RAM section."""
    out = []
    pos = codec.STREAM_HEADER_SIZE
    while pos < len(data):
        tag, flags, length, _, _ = codec.SECTION_HEADER.unpack_from(data, pos)
        body = pos + codec.SECTION_HEADER_SIZE
        if tag == codec.RAM:
            nruns = int.from_bytes(data[body : body + 4], "little")
            out.append((flags, body + 8 + 16 * nruns, body + length))
        pos = body + length
    return out


def decode_sealed(data: bytes, dest: GuestMemory, sealed: bool = True) -> RamReceiver:
    return load_ram(data, RamReceiver(dest), sealed=sealed)


def memory_for(layout: str, seed: int) -> GuestMemory:
    """Scattered pages (short runs: gathered) or all of RAM in use (long runs: copied run
    by run): the sender's two ways of taking a private copy."""
    if layout == "scattered":
        return filled_memory(seed)
    m = GuestMemory(MEM)
    m.pages()[:] = np.random.default_rng(seed).integers(1, 2**63, m.pages().shape, np.uint64)
    return m


@pytest.fixture(scope="module", params=["scattered", "dense"])
def sealed_live_stream(request: pytest.FixtureRequest) -> bytes:
    m = memory_for(request.param, 5)
    try:
        return encode_live(m, m.resident_pages(), sealed=True, sink=MemorySink())
    finally:
        m.close()


def test_a_sealed_live_send_checksums_its_page_data(sealed_live_stream: bytes) -> None:
    sections = ram_sections(sealed_live_stream)
    assert sections and all(flags == 0 for flags, _, _ in sections), "a live flag in a file"
    _, lo, hi = sections[0]
    assert hi > lo, "no page data to damage"
    data = bytearray(sealed_live_stream)
    data[(lo + hi) // 2] ^= 0x04
    dst = GuestMemory(MEM)
    try:
        with pytest.raises(StreamError, match=r"section #1 RAM at byte 58: checksum mismatch"):
            decode_sealed(bytes(data), dst)
    finally:
        dst.close()


def test_an_unsealed_live_section_leaves_page_data_out_and_a_sealed_reader_refuses_it() -> None:
    """The control for the test above, and what a file reader does with such a section."""
    m, dst = filled_memory(6), GuestMemory(MEM)
    try:
        live = encode_live(m, m.resident_pages(), sealed=False, sink=MemorySink())
        flags, lo, hi = ram_sections(live)[0]
        assert flags == codec.FLAG_LIVE
        data = bytearray(live)
        data[(lo + hi) // 2] ^= 0x04
        decode_sealed(bytes(data), dst, sealed=False)  # accepted: only digests could tell
        with pytest.raises(
            StreamError,
            match=r"^section #1 RAM at byte 58: live page data outside the checksum, which a "
            r"saved file must not have: the file is corrupt$",  # an older one: its version
        ):
            decode_sealed(live, dst)
    finally:
        m.close()
        dst.close()


@pytest.mark.parametrize("layout", ["scattered", "dense"])
def test_a_sealed_section_matches_its_checksum_though_the_guest_writes_meanwhile(
    layout: str,
) -> None:
    """The checksum and the bytes written come from one private copy: a page the guest
    changes after it was hashed cannot make a good file fail (or a bad one pass)."""
    src, dst = memory_for(layout, 7), GuestMemory(MEM)
    try:
        before = src.pages().copy()
        sink = GuestWritesDuringSend(src)
        pages = src.resident_pages()
        data = encode_live(src, pages, sealed=True, sink=sink)
        assert sink.wrote
        decode_sealed(data, dst)
        # The first section went out as it was when copied, before the guest wrote.
        first = pages[:128]
        assert np.array_equal(dst.pages()[first], before[first])
    finally:
        src.close()
        dst.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_damage_to_a_sealed_live_stream_is_a_stream_error(
    sealed_live_stream: bytes, data: st.DataObject
) -> None:
    damaged = bytearray(sealed_live_stream)
    # Page data is most of the stream: damage lands there as often as anywhere.
    for pos in data.draw(st.sets(st.integers(0, len(damaged) - 1), min_size=1, max_size=4)):
        damaged[pos] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    dst = GuestMemory(MEM)
    try:
        with pytest.raises(StreamError):
            decode_sealed(bytes(damaged[:cut] if data.draw(st.booleans()) else damaged), dst)
    finally:
        dst.close()


def test_error_messages_name_sections_as_the_format_document_does() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "stream-format.md").read_text()
    for tag in codec.SECTION_NAMES:
        name = codec.section_name(tag)
        assert name == tag.rstrip(b"\0").decode(), (tag, name)
        assert f"`{name}`" in doc, f"{name} is not in docs/stream-format.md"
    sink = MemorySink()
    w = StreamWriter(sink)
    w.section(codec.CONF, [b"{}"])
    w.section(codec.CPUS, [b"{}"])
    w.section(codec.ROUND, [b"{}"])
    r = StreamReader(MemorySource(bytes(sink.data)))
    r.read_payload(*r.next_section())
    r.read_payload(*r.next_section())
    with pytest.raises(StreamError, match=r"section #2 RND at byte \d+: a RND section cannot"):
        r.next_section()


def test_a_bad_device_chunk_names_its_section_and_offset() -> None:
    sink = MemorySink()
    w = StreamWriter(sink)
    conf = codec.ConfigRecord(MachineConfig(memory=MEM, image="hello"))
    w.section(codec.CONF, [conf.encode()])
    w.section(codec.DEVD, [DEVD_HEAD.pack(3, 0), b"state"])
    r = StreamReader(MemorySource(bytes(sink.data)))
    head = read_head(r)
    offset = r.source.position
    memory = GuestMemory(MEM)
    try:
        with pytest.raises(StreamError) as e:
            load_stream(head, r, memory, devices=DestinationDevices([]))
        assert str(e.value) == (
            f"section #1 DEVD at byte {offset}: it names device 3, phase 0: no such device or phase"
        )
    finally:
        memory.close()
