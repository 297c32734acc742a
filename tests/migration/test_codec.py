"""The wire codec: every section record and reply round-trips, and every malformed one is
refused with an error that names the section (or reply) and the field."""

from __future__ import annotations

import ctypes
import json
import struct
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from vmferry.devices.base import DeviceIdentity
from vmferry.errors import MigrationError, StreamError
from vmferry.kvm import uapi
from vmferry.machine.config import MachineConfig
from vmferry.machine.state import REG_NAMES, MachineState, VcpuState
from vmferry.migration import codec
from vmferry.migration.codec import (
    Abandon,
    AbandonNotice,
    Accepted,
    Alive,
    ChannelRecord,
    ConfigRecord,
    CpuStateRecord,
    DeviceSummary,
    Failed,
    Go,
    Ready,
    ReplyMessage,
    Resumed,
    RoundMarker,
    VerifyRecord,
    decode_reply,
    encode_reply,
)
from vmferry.migration.params import MAX_PEER_TIMEOUT_MS, MIN_PEER_TIMEOUT_MS

WHERE = "section #3 XXXX at byte 99"
u64 = st.integers(0, 2**64 - 1)
small_json = st.dictionaries(
    st.text(max_size=8), st.integers(-(2**31), 2**31) | st.text(max_size=8)
)


@st.composite
def configs(draw: st.DrawFn) -> MachineConfig:
    return MachineConfig(
        memory=draw(st.integers(8, 64)) * (2 << 20),
        vcpus=draw(st.integers(1, 4)),
        image=draw(st.sampled_from(["hello", "memtouch"])),
        cmdline=draw(st.text(max_size=20)),
    )


identities = st.builds(
    DeviceIdentity, st.text(min_size=1, max_size=10), st.integers(0, 2**31), small_json
)


@st.composite
def config_records(draw: st.DrawFn) -> ConfigRecord:
    config = draw(configs())
    cuts = sorted(draw(st.sets(st.integers(0, config.memory), max_size=8)))
    resident = tuple((a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if a < b)
    return ConfigRecord(
        config,
        draw(st.text(max_size=32)),
        draw(st.integers(1, 255)),
        resident,
        draw(st.sampled_from(["on", "strict", "off"])),
        tuple(draw(st.lists(identities, max_size=3))),
        draw(st.none() | st.integers(MIN_PEER_TIMEOUT_MS, MAX_PEER_TIMEOUT_MS)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.booleans()),
    )


def _blob(size: int) -> st.SearchStrategy[bytes]:
    # From a seed: a 4 KiB xsave drawn byte by byte is too big an example for hypothesis.
    return st.integers(0, 2**32).map(lambda seed: np.random.default_rng(seed).bytes(size))


@st.composite
def vcpu(draw: st.DrawFn, index: int) -> VcpuState:
    return VcpuState(
        index=index,
        regs={name: draw(u64) for name in REG_NAMES},
        sregs=draw(_blob(ctypes.sizeof(uapi.KvmSregs))),
        xsave=draw(_blob(uapi.SIZEOF_XSAVE)),
        xcrs=draw(_blob(uapi.SIZEOF_XCRS)),
        events=draw(_blob(uapi.SIZEOF_VCPU_EVENTS)),
        debugregs=draw(_blob(uapi.SIZEOF_DEBUGREGS)),
        mp_state=draw(st.integers(0, 8)),
        msrs=draw(st.dictionaries(st.integers(0, 2**32 - 1), u64, max_size=4)),
    )


@st.composite
def cpu_records(draw: st.DrawFn) -> CpuStateRecord:
    n = draw(st.integers(1, 3))
    return CpuStateRecord(draw(st.binary(max_size=48)), tuple(draw(vcpu(i)) for i in range(n)))


device_entries = st.fixed_dictionaries(
    {
        "model": st.text(max_size=8),
        "version": st.integers(0, 9),
        "config": small_json,
        "name": st.text(max_size=8),
        "dirty-tracking": st.sampled_from(["iommu", "device", "mediated", "none"]),
        "precopy-bytes": st.integers(0, 2**40),
        "stop-copy-bytes": st.integers(0, 2**40),
        "stop-copy-time": st.floats(0, 1e6, allow_nan=False),
        "dma-dirty-pages": st.integers(0, 2**30),
    }
)


@st.composite
def verify_records(draw: st.DrawFn) -> VerifyRecord:
    pages = np.array(sorted(draw(st.sets(st.integers(0, 4095), max_size=40))), dtype=np.int64)
    digests = np.array([draw(u64) for _ in range(pages.size)], dtype=np.uint64)
    return VerifyRecord(draw(st.integers(0, 2**63 - 1)), pages, digests, draw(u64))


findings = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["failed", "passed"]),
        "pages_checked": st.integers(0, 2**40),
        "mismatched_pages": st.lists(st.integers(0, 2**40), max_size=16),
        "cpu_state": st.sampled_from(["match", "mismatch", "off"]),
        "detail": st.text(max_size=20),
    }
)


replies: st.SearchStrategy[ReplyMessage] = st.one_of(
    st.just(Accepted()),
    st.builds(Ready, st.floats(0, 1e6), st.integers(0, 2**40), st.sampled_from(["passed", "off"])),
    st.just(Go()),
    st.builds(Resumed, st.floats(0, 1e6)),
    st.builds(Failed, st.text(), st.none() | findings),
    st.builds(Abandon, st.text(), st.booleans()),
    st.just(Alive()),
    st.builds(codec.Audit, st.integers(1, codec.AUDIT_HEAD.size + 8 * codec.MAX_AUDIT_PAGES)),
    st.builds(
        codec.Audited,
        st.sampled_from(["passed", "failed"]),
        st.integers(0, 2**40),
        st.floats(0, 1e6),
        st.lists(st.integers(0, 2**40), max_size=16),
        st.text(max_size=20),
    ),
)


@st.composite
def audit_chunks(draw: st.DrawFn) -> tuple[codec.AuditChunk, int]:
    npages = draw(st.integers(1, 4096))
    first = draw(st.integers(0, npages - 1))
    n = draw(st.integers(1, npages - first))
    seed = draw(st.integers(0, 2**32))
    digests = np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64)
    return codec.AuditChunk(first, digests, first + n == npages), npages


# ---- round trips


@given(config_records())
def test_config_round_trips(rec: ConfigRecord) -> None:
    assert ConfigRecord.decode(rec.encode(), WHERE) == rec


@given(st.text(max_size=40), st.integers(1, 254))
def test_channel_round_trips(mig_id: str, index: int) -> None:
    rec = ChannelRecord(mig_id, index)
    assert ChannelRecord.decode(rec.encode(), WHERE) == rec


@given(st.builds(RoundMarker, st.integers(0, 2**40), st.integers(0, 2**40), st.booleans()))
def test_round_marker_round_trips(rec: RoundMarker) -> None:
    assert RoundMarker.decode(rec.encode(), WHERE) == rec


@given(cpu_records())
def test_cpu_state_round_trips_and_fits_its_config(rec: CpuStateRecord) -> None:
    back = CpuStateRecord.decode(rec.encode(), WHERE)
    assert back == rec
    config = MachineConfig(memory=16 << 20, vcpus=len(rec.vcpus), image="hello")
    assert back.machine_state(config, WHERE) == MachineState(config, rec.clock, list(rec.vcpus))
    more = MachineConfig(memory=16 << 20, vcpus=len(rec.vcpus) + 1, image="hello")
    with pytest.raises(StreamError, match=rf"{WHERE} has vCPUs \[.*\], config says"):
        back.machine_state(more, WHERE)


@given(st.lists(device_entries, max_size=4))
def test_device_summary_round_trips(entries: list[dict[str, Any]]) -> None:
    rec = DeviceSummary(tuple(entries))
    assert DeviceSummary.decode(rec.encode(), WHERE) == rec


def test_device_summary_joins_identity_and_figures() -> None:
    ident = DeviceIdentity("nic", 2, {"queues": 4}).to_dict()
    stats = {
        "name": "nic0",
        "dirty-tracking": "iommu",
        "precopy-bytes": 1,
        "stop-copy-bytes": 2,
        "stop-copy-time": 0.5,
        "dma-dirty-pages": 3,
    }
    rec = DeviceSummary.of([ident], [stats])
    assert rec.devices == ({**ident, **stats},)
    with pytest.raises(StreamError, match="DEVS, device 0: field 'name' is missing"):
        DeviceSummary.of([ident], [{}])


@given(verify_records())
def test_verify_record_round_trips(rec: VerifyRecord) -> None:
    assert VerifyRecord.decode(b"".join(rec.encode()), WHERE, 4096) == rec


@given(st.text(), st.booleans())
def test_abandon_notice_round_trips(reason: str, cancelled: bool) -> None:
    rec = AbandonNotice(reason, cancelled)
    assert AbandonNotice.decode(rec.encode(), WHERE) == rec


@given(replies)
def test_replies_round_trip_as_one_line(msg: ReplyMessage) -> None:
    line = encode_reply(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_reply(line.rstrip(b"\n")) == msg


def test_reply_lines_keep_their_wire_names() -> None:
    """The destination's lines as peers (and the fuzz test) read them."""
    assert json.loads(encode_reply(Ready(1.5, 7, "passed"))) == {
        "kind": "ready",
        "verify_ms": 1.5,
        "pages_checked": 7,
        "verify": "passed",
        "drain_ms": 0.0,
    }
    ready = Ready(1.5, 7, "passed", 0.25)  # drain_ms: optional on the wire (0 when absent)
    assert decode_reply(encode_reply(ready).rstrip(b"\n")) == ready
    assert decode_reply(b'{"kind": "ready", "verify_ms": 1, "pages_checked": 7, "verify": "off"}')
    assert json.loads(encode_reply(Failed("no"))) == {"kind": "failed", "error": "no"}


def test_a_failed_check_comes_back_as_typed_findings() -> None:
    found = {
        "status": "failed",
        "pages_checked": 9,
        "mismatched_pages": [3, 5],
        "cpu_state": "match",
        "detail": "2 pages differ",
    }
    msg = decode_reply(encode_reply(Failed("bad", found)))
    assert isinstance(msg, Failed) and isinstance(msg.verify, codec.VerifyFindings)
    v = msg.verify
    assert (v.status, v.pages_checked, v.mismatched_pages) == ("failed", 9, [3, 5])
    assert (v.cpu_state, v.detail) == ("match", "2 pages differ")
    assert v.to_dict() == found and v.get("pages_checked") == 9  # read as a mapping too


# ---- refusals: each names the section and what is wrong


def _conf(**change: Any) -> bytes:
    obj = json.loads(ConfigRecord(MachineConfig(memory=32 << 20, image="hello")).encode())
    obj.update(change)
    return json.dumps(obj).encode()


CONF_REFUSALS = [
    (b"{not json", "is not valid JSON"),
    (b"[]", "the payload is list, want an object"),
    (_conf(channels=0), "field 'channels' is 0, want 1..255"),
    (_conf(channels=256), "field 'channels' is 256, want 1..255"),
    (_conf(channels=True), "field 'channels' is True, want int"),
    (_conf(verify="yes"), "field 'verify' is 'yes', want on, strict or off"),
    (_conf(verify=True), "field 'verify' is True, want str"),
    (_conf(**{"verify-seed": -1}), "field 'verify-seed' is -1, want 0.."),
    (_conf(**{"verify-hold-output": 1}), "field 'verify-hold-output' is 1, want bool"),
    (_conf(id=7), "field 'id' is 7, want str"),
    (_conf(resident=[[0, 64 << 20]]), "resident range 0..67108864 lies outside guest RAM"),
    (_conf(resident=[[5, 5]]), "resident range 5..5 lies outside"),
    (_conf(resident=[[1]]), "field 'resident' holds [1], want [start, end]"),
    (_conf(devices=[{"model": "nic", "version": "2", "config": {}}]), "device 0: field 'version'"),
    (_conf(devices=["nic"]), "device 0: the identity is 'nic', want an object"),
    (_conf(**{"peer-timeout-ms": 5}), "field 'peer-timeout-ms' is 5, want 100..600000"),
    (_conf(config={"memory": 1}), "holds no usable machine config"),
    (_conf(config={"memory": 2 << 40, "image": "hello"}), "holds no usable machine config"),
]


@pytest.mark.parametrize(("payload", "why"), CONF_REFUSALS)
def test_config_refusals_name_section_and_field(payload: bytes, why: str) -> None:
    with pytest.raises(StreamError) as e:
        ConfigRecord.decode(payload, WHERE)
    assert str(e.value).startswith(WHERE) and why in str(e.value), str(e.value)


def test_every_config_field_is_required() -> None:
    for key in json.loads(_conf()):
        obj = json.loads(_conf())
        del obj[key]
        with pytest.raises(StreamError, match=f"{WHERE}: field '{key}' is missing"):
            ConfigRecord.decode(json.dumps(obj).encode(), WHERE)


OTHER_REFUSALS: list[tuple[Any, bytes, str]] = [
    (ChannelRecord, b'{"id": "m", "index": 0}', "field 'index' is 0, want 1..254"),
    (ChannelRecord, b'{"index": 1}', "field 'id' is missing"),
    (RoundMarker, b'{"round": -1, "pages": 0, "stop-copy": false}', "field 'round' is -1"),
    (RoundMarker, b'{"round": 1, "pages": 0}', "field 'stop-copy' is missing"),
    (CpuStateRecord, b'{"clock": "zz", "vcpus": []}', "field 'clock' is not hex"),
    (CpuStateRecord, b'{"clock": "", "vcpus": [3]}', "vCPU 0 is 3, want an object"),
    (CpuStateRecord, b'{"clock": "", "vcpus": [{}]}', "vCPU state is malformed"),
    (DeviceSummary, b"{}", "the payload is dict, want a list"),
    (DeviceSummary, b"[7]", "device 0: the entry is 7, want an object"),
    (DeviceSummary, b'[{"model": "x"}]', "device 0: field 'version' is missing"),
    (AbandonNotice, b'{"reason": 3, "cancelled": false}', "field 'reason' is 3, want str"),
    (AbandonNotice, b'{"reason": "r"}', "field 'cancelled' is missing"),
]


@pytest.mark.parametrize(("cls", "payload", "why"), OTHER_REFUSALS)
def test_section_refusals_name_section_and_field(cls: Any, payload: bytes, why: str) -> None:
    with pytest.raises(StreamError) as e:
        cls.decode(payload, WHERE)
    assert str(e.value).startswith(WHERE) and why in str(e.value), str(e.value)


def test_verify_record_refusals() -> None:
    rec = VerifyRecord(1, np.array([3, 9], dtype=np.int64), np.array([1, 2], dtype=np.uint64), 5)
    data = b"".join(rec.encode())
    with pytest.raises(StreamError, match=f"{WHERE}: 4 bytes is too short"):
        VerifyRecord.decode(data[:4], WHERE, 16)
    with pytest.raises(StreamError, match=f"{WHERE} has {len(data) - 1} bytes for 2 pages"):
        VerifyRecord.decode(data[:-1], WHERE, 16)
    with pytest.raises(StreamError, match=f"{WHERE} lists pages outside guest RAM"):
        VerifyRecord.decode(data, WHERE, 9)
    swapped = VerifyRecord(1, rec.pages[::-1].copy(), rec.digests, 5)
    with pytest.raises(StreamError, match="out of order"):
        VerifyRecord.decode(b"".join(swapped.encode()), WHERE, 16)


@given(audit_chunks())
def test_audit_chunk_round_trips(chunk_and_size: tuple[codec.AuditChunk, int]) -> None:
    chunk, npages = chunk_and_size
    assert codec.AuditChunk.decode(chunk.encode(npages), WHERE, npages) == chunk


def test_audit_chunk_refusals() -> None:
    chunk = codec.AuditChunk(4, np.arange(1, 5, dtype=np.uint64), True)
    data = chunk.encode(8)
    with pytest.raises(StreamError, match=f"{WHERE}: 4 bytes is too short"):
        codec.AuditChunk.decode(data[:4], WHERE, 8)
    with pytest.raises(StreamError, match=f"{WHERE} is for a guest of 8 pages, this one has 9"):
        codec.AuditChunk.decode(data, WHERE, 9)
    with pytest.raises(StreamError, match=f"{WHERE} has {len(data) - 1} bytes for 4 digests"):
        codec.AuditChunk.decode(data[:-1], WHERE, 8)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    with pytest.raises(StreamError, match="checksum does not match"):
        codec.AuditChunk.decode(bytes(flipped), WHERE, 8)
    past = codec.AuditChunk(6, np.arange(1, 5, dtype=np.uint64)).encode(8)
    with pytest.raises(StreamError, match=r"pages 6\+4 lie outside guest RAM \(8\)"):
        codec.AuditChunk.decode(past, WHERE, 8)
    big = codec.AuditChunk(0, np.ones(codec.MAX_AUDIT_PAGES + 1, dtype=np.uint64))
    with pytest.raises(StreamError, match="holds 16385 digests: at most 16384 per chunk"):
        codec.AuditChunk.decode(big.encode(1 << 20), WHERE, 1 << 20)
    empty = codec.AUDIT_HEAD.pack(0, 0, 8, 0)
    with pytest.raises(StreamError, match=r"pages 0\+0 lie outside"):
        codec.AuditChunk.decode(empty, WHERE, 8)


def test_end_sections_carry_nothing() -> None:
    codec.check_empty(b"", WHERE)
    with pytest.raises(StreamError, match=f"{WHERE}: 1 bytes where nothing belongs"):
        codec.check_empty(b"x", WHERE)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"{", "the peer sent a malformed reply: "),
        (b"[1]", "the peer sent a malformed reply: b'[1]' has no kind"),
        (b'{"kind": 5}', "has no kind"),
        (b'{"kind": "x"}', "the peer sent an unknown reply kind 'x'"),
        (b'{"kind": "ready", "verify_ms": 1}', "'ready' reply: field 'pages_checked' is missing"),
        (
            b'{"kind": "ready", "verify_ms": 1, "pages_checked": -1, "verify": "off"}',
            "field 'pages_checked' is -1",
        ),
        (b'{"kind": "resumed", "resume_ms": "1"}', "field 'resume_ms' is '1', want int or float"),
        (b'{"kind": "failed"}', "'failed' reply: field 'error' is missing"),
        (b'{"kind": "audit", "bytes": 0}', "'audit' reply: field 'bytes' is 0, want 1.."),
        (b'{"kind": "audit", "bytes": 1073741824}', "field 'bytes' is 1073741824"),
        (
            b'{"kind": "audited", "status": "maybe", "pages_checked": 1, "audit_ms": 1,'
            b' "mismatched_pages": [], "detail": ""}',
            "field 'status' is 'maybe'",
        ),
        (
            b'{"kind": "audited", "status": "failed", "pages_checked": 1, "audit_ms": 1,'
            b' "mismatched_pages": [-3], "detail": ""}',
            "field 'mismatched_pages' is not a list",
        ),
        (b'{"kind": "failed", "error": "e", "verify": 1}', "field 'verify' is 1"),
        (b'{"kind": "abandon", "reason": "r", "cancelled": 1}', "field 'cancelled' is 1"),
        # JSON the json module refuses with other errors than JSONDecodeError
        (b'{"kind": "ready", "pages_checked": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"kind": "go"}\xff', "not valid JSON"),
        # figures: finite and not negative
        (b'{"kind": "ready", "verify_ms": NaN, "pages_checked": 1, "verify": "off"}', "nan"),
        (b'{"kind": "ready", "verify_ms": -1, "pages_checked": 1, "verify": "off"}', "-1"),
        (b'{"kind": "resumed", "resume_ms": Infinity}', "field 'resume_ms' is inf"),
        # a failed check's findings: all five fields, typed
        (
            b'{"kind": "failed", "error": "e", "verify": {"mismatched_pages": 5}}',
            "field 'verify': field 'mismatched_pages' is 5, want list",
        ),
        (
            b'{"kind": "failed", "error": "e", "verify": {"mismatched_pages": [1]}}',
            "reply, field 'verify': field 'status' is missing",
        ),
        (
            b'{"kind": "failed", "error": "e", "verify": {"mismatched_pages": [-1]}}',
            "not a list of at most",
        ),
    ],
)
def test_reply_refusals(line: bytes, why: str) -> None:
    with pytest.raises(MigrationError) as e:
        decode_reply(line)
    assert why in str(e.value), str(e.value)
    assert str(e.value).startswith("the peer sent"), str(e.value)


@pytest.mark.parametrize(
    "payload",
    [b'{"round": 1' + b"0" * 5000 + b', "pages": 1, "stop-copy": false}', b"[" * 100_000],
)
def test_json_the_parser_cannot_take_is_a_stream_error(payload: bytes) -> None:
    for decode in (RoundMarker.decode, DeviceSummary.decode, ConfigRecord.decode):
        with pytest.raises(StreamError, match=f"{WHERE} is not valid JSON"):
            decode(payload, WHERE)


# ---- the stream header and its version


def _header(version: int, magic: bytes = codec.MAGIC) -> bytes:
    head = codec.STREAM_HEADER.pack(magic, version, 0)
    return head + struct.pack("<Q", xxhash.xxh64_intdigest(head))


def test_stream_header_round_trips() -> None:
    assert codec.encode_stream_header() == _header(codec.VERSION)
    assert len(codec.encode_stream_header()) == codec.STREAM_HEADER_SIZE
    codec.check_stream_header(codec.encode_stream_header())


@pytest.mark.parametrize(
    ("version", "rel"), [(codec.VERSION + 1, "newer than"), (codec.VERSION - 1, "older than")]
)
def test_another_version_is_refused_with_both_numbers(version: int, rel: str) -> None:
    want = (
        f"stream format version {version} is {rel} this vmferry's ({codec.VERSION}); "
        "use a matching vmferry"
    )
    with pytest.raises(StreamError) as e:
        codec.check_stream_header(_header(version))
    assert str(e.value) == want


def test_a_damaged_header_is_refused() -> None:
    with pytest.raises(StreamError, match="not a vmferry stream"):
        codec.check_stream_header(_header(codec.VERSION, b"VMFERRY!"))
    bad = bytearray(_header(codec.VERSION))
    bad[-1] ^= 1
    with pytest.raises(StreamError, match="stream header checksum mismatch"):
        codec.check_stream_header(bad)


def test_every_tag_has_a_name_and_a_limit() -> None:
    assert set(codec.SECTION_NAMES) == set(codec.MAX_PAYLOAD)
    assert all(len(tag) == 4 for tag in codec.SECTION_NAMES)
    assert codec.RUN_DTYPE.itemsize == 16 and codec.RAM_HEAD.size == 8


def test_the_peer_watch_takes_any_error_in_a_reply_for_the_peer_failing() -> None:
    """Not only a MigrationError: a reply whose decoding raised anything else ends the
    watch with "malformed reply" at once (its thread used to die, and the source then
    waited out the timeout and called the peer silent)."""
    from vmferry.migration.liveness import PeerWatch

    class Garbled:
        def receive(self, timeout: float, waiting_for: str) -> ReplyMessage:
            raise ValueError("Exceeds the limit (4300 digits)")

    watch = PeerWatch(Garbled(), 30.0)  # type: ignore[arg-type]
    watch.start()
    with pytest.raises(MigrationError, match="malformed reply") as e:
        watch.next(5.0, "the answer")
    assert not watch.silent and "4300 digits" in str(e.value)
    watch.stop()
