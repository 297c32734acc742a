"""Random damage to a real migration stream: the destination refuses it with a vmferry
error (nothing else escapes, nothing hangs, no guest starts), or — where the damage fell on
page data the checksum does not cover — the switchover digests catch it before the guest
could run, or the damage was harmless (the loaded VM is exactly the undamaged one). The
recordings are ``migrate file:`` files, whose every byte is checksummed: read as files,
any damage at all is refused."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.migration.live import Destination, Guest, Workload, start_migration, wait_migration
from vmferry.errors import MigrationError, StreamError
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration import codec
from vmferry.migration.codec import RAM_HEAD
from vmferry.migration.loader import LoadedStream, load_stream, read_head
from vmferry.migration.params import MigrationParameters
from vmferry.migration.stream import StreamReader, StreamWriter
from vmferry.migration.verify import cpu_digest, mismatched_pages
from vmferry.testing.transport import MemorySink, MemorySource

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

# A small VM: 32 MiB of RAM, 2 MiB working set, still running when it is recorded.
SMALL = Workload("2M", seed=21, rounds=200, rate=8, memory=32 << 20)
EXPECTED = (StreamError, MigrationError)


@dataclass(repr=False)  # hypothesis prints arguments: not megabytes of stream
class Recording:
    data: bytes
    pages: npt.NDArray[np.uint64]  # guest RAM as the undamaged stream loads it
    cpu: int
    structure: list[int]  # offsets of bytes the loader interprets (headers, tables, JSON)
    boundaries: list[int]  # section starts
    live_data: list[tuple[int, int]]  # page data outside the checksum (FLAG_LIVE sections)


def load(data: bytes, timeout: float = 30.0, *, sealed: bool = False) -> LoadedStream:
    """What ``--incoming`` does with a stream before any machine exists; it must end (with
    a result or an exception) within ``timeout``. ``sealed``: read it as a file is read."""
    out: list[LoadedStream] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            reader = StreamReader(MemorySource(data), sealed=sealed)
            head = read_head(reader)
            memory = GuestMemory(head.config.memory)
            try:
                out.append(load_stream(head, reader, memory))
            except BaseException:
                memory.close()
                raise
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"loading did not end within {timeout} s"
    if err:
        raise err[0]
    return out[0]


def structure_of(data: bytes) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Offsets of every header byte, RAM run table and small payload; section starts; the
    page data of FLAG_LIVE sections."""
    structural = list(range(codec.STREAM_HEADER_SIZE))
    starts = []
    live: list[tuple[int, int]] = []
    pos = codec.STREAM_HEADER_SIZE
    while pos < len(data):
        starts.append(pos)
        tag, flags, length, _, _ = codec.SECTION_HEADER.unpack_from(data, pos)
        structural += range(pos, pos + codec.SECTION_HEADER_SIZE)
        body = pos + codec.SECTION_HEADER_SIZE
        if tag == codec.RAM and not flags & codec.FLAG_ZSTD:
            nruns = int.from_bytes(data[body : body + 4], "little")
            structural += range(body, body + 8 + 16 * nruns)
            if flags & codec.FLAG_LIVE and length > 8 + 16 * nruns:
                live.append((body + 8 + 16 * nruns, body + length))
        elif tag != codec.RAM:
            structural += range(body, body + min(length, 4096))
        pos = body + length
    return structural, starts, live


def record(tmp: Path, compress: str) -> Recording:
    guest = Guest(SMALL)
    try:
        path = tmp / f"small-{compress}.migration"
        src = start_migration(
            guest, f"file:{path}", MigrationParameters(multifd_compression=compress)
        )
        wait_migration(src)
        assert src.stats.status == "completed", src.stats.error
    finally:
        guest.close()
    data = path.read_bytes()
    loaded = load(data, sealed=True)  # a file has no section with page data unchecked
    try:
        pages = loaded.memory.pages().copy()
        cpu = cpu_digest(loaded.state)
        assert loaded.verify is not None and loaded.verify.cpu == cpu
        assert loaded.written is not None
        assert mismatched_pages(loaded.memory, loaded.verify, loaded.written) == []
    finally:
        loaded.memory.close()
    return Recording(data, pages, cpu, *structure_of(data))


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Recording]:
    tmp = tmp_path_factory.mktemp("recorded")
    return {c: record(tmp, c) for c in ("none", "zstd")}


@st.composite
def damaged(draw: st.DrawFn, rec: Recording) -> bytes:
    data = bytearray(rec.data)
    anywhere = st.integers(0, len(data) - 1)
    position = st.one_of(anywhere, st.sampled_from(rec.structure))
    kind = draw(st.sampled_from(["flip", "flip", "flip-page", "truncate", "insert", "delete"]))
    if kind == "flip-page" and not rec.live_data:
        kind = "flip"
    if kind == "flip-page":  # where only the digests can tell
        lo, hi = draw(st.sampled_from(rec.live_data))
        data[draw(st.integers(lo, hi - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "flip":
        # Distinct positions: two flips of one byte could cancel out.
        for pos in draw(st.sets(position, min_size=1, max_size=4)):
            data[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        near = st.builds(
            lambda b, d: max(0, b + d), st.sampled_from(rec.boundaries), st.integers(-40, 40)
        )
        data = data[: draw(st.one_of(anywhere, near))]
    elif kind == "insert":
        at = draw(st.one_of(position, st.sampled_from(rec.boundaries)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    else:
        at = draw(position)
        del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_damage_to_a_file_is_refused_before_anything_runs(
    recordings: dict[str, Recording], data: st.DataObject
) -> None:
    """No digests needed: a flipped page byte is a checksum mismatch like any other."""
    rec = recordings[data.draw(st.sampled_from(sorted(recordings)), label="recording")]
    bad = data.draw(damaged(rec), label="damaged")
    if bad == rec.data:  # a "truncation" past the end
        load(bad, sealed=True).memory.close()
        return
    with pytest.raises(StreamError):
        load(bad, sealed=True)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_damage_is_refused_or_caught_by_verification(
    recordings: dict[str, Recording], data: st.DataObject
) -> None:
    rec = recordings[data.draw(st.sampled_from(sorted(recordings)), label="recording")]
    bad = data.draw(damaged(rec), label="damaged")
    try:
        loaded = load(bad)
    except EXPECTED as e:
        event(f"refused: {type(e).__name__}")
        return
    try:
        assert loaded.verify is not None and loaded.written is not None
        wrong_pages = mismatched_pages(loaded.memory, loaded.verify, loaded.written)
        wrong_cpu = cpu_digest(loaded.state) != loaded.verify.cpu
        event("caught by verification" if wrong_pages or wrong_cpu else "harmless")
        if not wrong_pages and not wrong_cpu:
            # Accepted and verified: then it must be the VM that was recorded.
            assert cpu_digest(loaded.state) == rec.cpu
            assert np.array_equal(loaded.memory.pages(), rec.pages)
    finally:
        loaded.memory.close()


# ---- the same, through a socket to a real destination


def feed(port: int, data: bytes) -> list[dict[str, object]]:
    """Play ``data`` as a source would, answer nothing, and collect the replies."""
    replies: list[dict[str, object]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:

        def send() -> None:
            with contextlib.suppress(OSError):  # the destination may hang up first
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        buf = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                replies += [json.loads(line) for line in lines]
                if any(r["kind"] == "ready" for r in replies):
                    break  # never say go: hang up instead
        sender.join(30)
    return replies


@pytest.fixture
def destinations() -> Iterator[list[Destination]]:
    made: list[Destination] = []
    yield made
    for d in made:
        d.close()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(data=st.data())
def test_a_real_destination_refuses_damage_and_starts_nothing(
    recordings: dict[str, Recording], destinations: list[Destination], data: st.DataObject
) -> None:
    rec = recordings["none"]
    bad = data.draw(damaged(rec), label="damaged")
    dest = Destination()
    destinations.append(dest)
    replies = feed(dest.port, bad)
    if bad[: len(codec.MAGIC)] != codec.MAGIC and dest.incoming.refusals:
        # Not a vmferry stream at all: a stranger's, refused; the destination listens on.
        # Told so, unless the reset of its unread bytes overtook the reply.
        assert [r["kind"] for r in replies] in ([], ["failed"]), replies
        assert "not a vmferry stream" in dest.incoming.refusals[0]
        assert dest.result is None and dest.error is None, dest.error
        return
    err = dest.failure(30)  # no guest: the source never said go
    assert isinstance(err, EXPECTED), repr(err)
    kinds = [r["kind"] for r in replies]
    assert set(kinds) <= {"accepted", "ready", "failed"}, replies
    assert "ready" in kinds or kinds[-1:] == ["failed"], replies


def test_the_undamaged_stream_is_accepted_through_a_socket(
    recordings: dict[str, Recording],
) -> None:
    """The control for the test above: the recorded stream itself gets to ``ready``."""
    dest = Destination()
    try:
        replies = feed(dest.port, recordings["none"].data)
        ready = [r for r in replies if r["kind"] == "ready"]
        assert ready and ready[0]["verify"] == "passed", replies
        err = dest.failure(30)
        assert isinstance(err, MigrationError) and (
            'the source closed the connection before "go"' in str(err)
        ), err
    finally:
        dest.close()


# ---- well-formed but wrong: damage re-signed with valid checksums (a buggy or hostile peer)


@dataclass
class Section:
    tag: bytes
    flags: int
    payload: bytes


def sections_of(data: bytes) -> list[Section]:
    out = []
    pos = codec.STREAM_HEADER_SIZE
    while pos < len(data):
        tag, flags, length, _, _ = codec.SECTION_HEADER.unpack_from(data, pos)
        body = pos + codec.SECTION_HEADER_SIZE
        out.append(Section(tag, flags, data[body : body + length]))
        pos = body + length
    return out


def build(sections: list[Section]) -> bytes:
    """A stream of these sections, numbered and checksummed as a source writes them."""
    sink = MemorySink()
    w = StreamWriter(sink)
    for s in sections:
        p = s.payload
        if s.tag == codec.RAM and s.flags & codec.FLAG_LIVE and len(p) >= RAM_HEAD.size:
            hashed = min(RAM_HEAD.size + 16 * RAM_HEAD.unpack_from(p)[0], len(p))
            w.section(s.tag, [p[:hashed], p[hashed:]], flags=s.flags, hashed=1)
        else:
            w.section(s.tag, [p], flags=s.flags)
    return bytes(sink.data)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 255, 256, 16 << 20, 1 << 32, 1 << 40, 1 << 41, 1 << 63, 1 << 64])
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
INTERESTING = [0, 1, 2, 63, 64, 511, 512, 4095, 4096, 8191, 8192, (1 << 32) - 1, 1 << 31]


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated_json(draw: st.DrawFn, payload: bytes) -> bytes:
    obj = json.loads(payload)
    path = draw(st.sampled_from(paths(obj)))
    if not path:
        return json.dumps(draw(JSON_VALUES)).encode()
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(obj).encode()


@st.composite
def mutated_ram(draw: st.DrawFn, payload: bytes) -> bytes:
    p = bytearray(payload)
    nruns = RAM_HEAD.unpack_from(p)[0]
    if nruns == 0 or draw(st.integers(0, 4)) == 0:
        struct.pack_into("<I", p, 0, draw(st.sampled_from([*INTERESTING, nruns + 1, nruns - 1])))
    else:
        run = draw(st.integers(0, nruns - 1))
        field = draw(st.sampled_from([("<Q", 0), ("<I", 8), ("<I", 12)]))
        value = draw(st.sampled_from([*INTERESTING, 1 << 62, (1 << 64) - 1]))
        if field[0] == "<I":
            value &= (1 << 32) - 1
        struct.pack_into(field[0], p, RAM_HEAD.size + 16 * run + field[1], value)
    return bytes(p)


@st.composite
def resigned(draw: st.DrawFn, rec: Recording) -> bytes:
    secs = sections_of(rec.data)
    kind = draw(st.sampled_from(["json", "ram", "zstd", "vrfy", "order", "flags"]))
    json_secs = [
        i for i, s in enumerate(secs) if s.tag in (codec.CONF, codec.ROUND, codec.CPUS, codec.DEVS)
    ]
    ram = [i for i, s in enumerate(secs) if s.tag == codec.RAM]
    plain = [i for i in ram if not secs[i].flags & codec.FLAG_ZSTD]
    packed = [i for i in ram if secs[i].flags & codec.FLAG_ZSTD]
    if kind == "json":
        i = draw(st.sampled_from(json_secs))
        secs[i].payload = draw(mutated_json(secs[i].payload))
    elif kind == "ram" and plain:
        i = draw(st.sampled_from(plain))
        secs[i].payload = draw(mutated_ram(secs[i].payload))
    elif kind == "zstd" and packed:
        i = draw(st.sampled_from(packed))
        how = draw(st.sampled_from(["garbage", "frame-of-garbage", "bad-table", "no-size"]))
        raw = zstandard.decompress(secs[i].payload)
        if how == "garbage":
            secs[i].payload = draw(st.binary(max_size=64))
        elif how == "frame-of-garbage":
            secs[i].payload = zstandard.compress(draw(st.binary(max_size=256)))
        elif how == "bad-table":
            secs[i].payload = zstandard.compress(draw(mutated_ram(raw)))
        else:  # a frame that does not say how big its content is
            c = zstandard.ZstdCompressor(write_content_size=False)
            secs[i].payload = c.compress(raw)
    elif kind == "vrfy":
        i = next(i for i, s in enumerate(secs) if s.tag == codec.VRFY)
        p = bytearray(secs[i].payload)
        at = draw(st.sampled_from([0, 8, 16, 24, len(p) - 8]))
        struct.pack_into("<Q", p, at, draw(st.sampled_from([*INTERESTING, (1 << 64) - 1])))
        secs[i].payload = bytes(p)
    elif kind == "flags":
        i = draw(st.integers(0, len(secs) - 1))
        secs[i].flags = draw(st.integers(0, 7))
    else:
        i = draw(st.integers(0, len(secs) - 2))
        op = draw(st.sampled_from(["drop", "dup", "swap"]))
        if op == "drop":
            del secs[i]
        elif op == "dup":
            secs.insert(i, Section(secs[i].tag, secs[i].flags, secs[i].payload))
        else:
            secs[i], secs[i + 1] = secs[i + 1], secs[i]
    return build(secs)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_well_formed_nonsense_is_refused_with_a_stream_error(
    recordings: dict[str, Recording], data: st.DataObject
) -> None:
    rec = recordings[data.draw(st.sampled_from(sorted(recordings)), label="recording")]
    bad = data.draw(resigned(rec), label="resigned")
    try:
        loaded = load(bad)
    except EXPECTED as e:
        event(f"refused: {type(e).__name__}")
        return
    event("loaded")
    try:  # whatever loads must still verify without crashing
        assert loaded.written is not None
        if loaded.verify is not None:
            mismatched_pages(loaded.memory, loaded.verify, loaded.written)
    finally:
        loaded.memory.close()
