"""The in-memory transport pair: a stream written into a MemorySink reads back from a
MemorySource (or across a memory_pipe) section by section, and every way it can end
early says where."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from vmferry.errors import StreamError
from vmferry.migration import codec
from vmferry.migration.stream import StreamReader, StreamWriter
from vmferry.migration.transport import Buffer, Sink, Source, StreamEndsEarly
from vmferry.testing.transport import MemorySink, MemorySource, memory_pipe

SECTIONS = [
    (codec.CONF, b'{"config": {}}'),
    (codec.RAM, bytes(range(256)) * 64),
    (codec.RAM, b""),
    (codec.CPUS, b"{}"),
    (codec.DEVS, b"[]"),
    (codec.END, b""),
]


def write_stream(sink: Sink) -> None:
    w = StreamWriter(sink)
    for tag, payload in SECTIONS:
        w.section(tag, [payload])


def read_stream(source: Source) -> list[tuple[bytes, bytes]]:
    r = StreamReader(source)
    out = []
    while True:
        hdr, h = r.next_section()
        out.append((hdr.tag, r.read_payload(hdr, h)))
        if hdr.tag == codec.END:
            return out


def test_a_stream_round_trips_through_the_memory_pair() -> None:
    sink = MemorySink()
    write_stream(sink)
    data = sink.getvalue()
    assert sink.written == len(data) == len(sink.view())
    assert sink.writes == 1 + len(SECTIONS)  # the stream header, then one per section
    source = MemorySource(data)
    assert read_stream(source) == SECTIONS
    assert source.position == len(data) and source.remaining == 0


def test_the_sink_copies_what_it_is_given() -> None:
    # A writer hands over views of guest RAM, which the guest may change right after.
    sink = MemorySink()
    page = bytearray(b"before")
    sink.write([memoryview(page), b"!"])
    page[:] = b"after!"
    assert sink.getvalue() == b"before!"
    sink.clear()
    assert sink.getvalue() == b"" and sink.written == 7


def test_a_closed_memory_transport_refuses_io() -> None:
    sink, source = MemorySink(), MemorySource(b"abc")
    sink.close()
    source.close()
    with pytest.raises(ValueError, match="closed MemorySink"):
        sink.write([b"x"])
    with pytest.raises(ValueError, match="closed MemorySource"):
        source.readinto(memoryview(bytearray(1)))


def test_a_short_source_ends_early_where_its_bytes_end() -> None:
    source = MemorySource(b"abcdef", name="channel 1")
    buf = bytearray(4)
    source.readinto(memoryview(buf))
    assert buf == b"abcd" and source.position == 4
    with pytest.raises(StreamEndsEarly, match=r"^channel 1 ends early at byte 6: 2 more bytes"):
        source.readinto(memoryview(buf))
    assert source.position == 4, "a failed read consumed bytes"


def test_a_truncated_stream_names_the_section_it_ends_in() -> None:
    sink = MemorySink()
    write_stream(sink)
    data = sink.getvalue()
    cut = data.index(bytes(range(256))) + 1000  # inside the first RAM section's payload
    with pytest.raises(StreamError, match=r"^section #1 RAM at byte \d+ is truncated: stream"):
        read_stream(MemorySource(data[:cut]))


def test_a_tamper_hook_damages_the_stream_in_flight() -> None:
    def flip_a_bit_in_ram(bufs: Sequence[Buffer]) -> Sequence[Buffer]:
        head, *payload = bufs
        if bytes(head[:4]) != codec.RAM or not any(len(b) for b in payload):
            return bufs
        body = bytearray(b"".join(bytes(b) for b in payload))
        body[len(body) // 2] ^= 0x08
        return [head, body]

    sink = MemorySink(tamper=flip_a_bit_in_ram)
    write_stream(sink)
    with pytest.raises(StreamError, match=r"^section #1 RAM at byte \d+: checksum mismatch"):
        read_stream(MemorySource(sink.getvalue()))


def test_a_stream_crosses_a_memory_pipe_between_threads() -> None:
    sink, source = memory_pipe(timeout_s=10)

    def write_and_close() -> None:
        write_stream(sink)
        sink.close()

    writer = threading.Thread(target=write_and_close)
    writer.start()
    try:
        assert read_stream(source) == SECTIONS
    finally:
        writer.join(10)
    assert source.position == sink.written


def test_a_pipe_whose_writer_closes_ends_early() -> None:
    sink, source = memory_pipe(name="migration stream")
    sink.write([b"abc"])
    sink.close()
    buf = bytearray(5)
    with pytest.raises(StreamEndsEarly, match=r"^migration stream ends early at byte 3: 2 more"):
        source.readinto(memoryview(buf))


def test_a_pipe_whose_reader_closes_is_broken_for_the_writer() -> None:
    sink, source = memory_pipe()
    source.close()
    with pytest.raises(BrokenPipeError):
        sink.write([b"abc"])


def test_a_pipe_read_that_waits_too_long_times_out() -> None:
    sink, source = memory_pipe(timeout_s=0.05)
    sink.write([b"ab"])
    with pytest.raises(TimeoutError, match=r"no 2 more bytes at byte 2 within 0\.05 s"):
        source.readinto(memoryview(bytearray(4)))
