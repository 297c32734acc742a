"""The stream on its own: RAM sections round-trip, and every kind of damage is named."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmferry.errors import StreamError
from vmferry.memory import GuestMemory
from vmferry.migration import stream
from vmferry.migration.ram import RamReceiver, send_pages
from vmferry.migration.stream import StreamReader, StreamWriter
from vmferry.migration.transport import FdSink, FdSource

MEM = 32 << 20


class BytesSink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, bufs: object) -> None:
        for b in bufs:  # type: ignore[attr-defined]
            self.data += bytes(b)

    def close(self) -> None:
        pass


class BytesSource:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def readinto(self, buf: memoryview) -> None:
        n = len(buf.cast("B"))
        if self.position + n > len(self.data):
            raise StreamError(f"stream ends early at byte {len(self.data)}")
        buf.cast("B")[:] = self.data[self.position : self.position + n]
        self.position += n

    def close(self) -> None:
        pass


def filled_memory(seed: int) -> GuestMemory:
    m = GuestMemory(MEM)
    rng = np.random.default_rng(seed)
    pages = m.pages()
    touched = rng.choice(m.npages, 600, replace=False)
    pages[touched] = rng.integers(0, 2**63, size=(600, 512), dtype=np.uint64)
    pages[touched[:50]] = 0  # resident but zero
    return m


def encode(m: GuestMemory, pages: np.ndarray) -> bytes:
    sink = BytesSink()
    w = StreamWriter(sink)
    w.section(stream.CONF, [b"{}"])
    send_pages(w, m, pages, batch_pages=128)
    w.section(stream.CPUS, [b"{}"])
    w.section(stream.DEVS, [b"[]"])
    w.section(stream.END, [])
    return bytes(sink.data)


def decode(data: bytes, dest: GuestMemory) -> RamReceiver:
    r = StreamReader(BytesSource(data))
    rx = RamReceiver(dest)
    while True:
        hdr, h = r.next_section()
        if hdr.tag == stream.RAM:
            rx.load(r, hdr, h)
        else:
            r.read_payload(hdr, h)
            if hdr.tag == stream.END:
                return rx


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
        while (hs := reader.next_section())[0].tag != stream.END:
            if hs[0].tag == stream.RAM:
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

    head = struct.pack("<8sII", stream.MAGIC, stream.VERSION + 1, 0)
    data = head + struct.pack("<Q", xxhash.xxh64_intdigest(head)) + valid_stream[24:]
    with pytest.raises(StreamError, match=r"version 2 is newer than this vmferry's \(1\)"):
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
