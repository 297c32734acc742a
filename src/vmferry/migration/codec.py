"""The wire: the one module that knows the byte layout of the stream and the reply path.

Stream layout (little-endian):

    stream header  magic "VMFERRY\\n" | u32 version | u32 flags | u64 xxh64(previous 16 bytes)
    section*       tag[4] | u32 flags | u64 length | u32 seq | u32 reserved | u64 checksum
                   payload[length]

Each section's payload has a typed record here (``encode``, and ``decode`` that validates
and raises a StreamError naming the section and the field); RAM and DEVD payloads are bulk
data, so only their layouts live here (ram.py and devices.py pack them with numpy). The
reply path carries one JSON object per line, each a ``ReplyMessage``. The format has one
VERSION: a stream of another is refused whole, with both numbers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.devices.base import DeviceIdentity
from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.machine.config import MachineConfig
from vmferry.machine.state import MachineState, VcpuState
from vmferry.memory.guest_memory import MAX_RAM
from vmferry.migration.params import MAX_PEER_TIMEOUT_MS, MIN_PEER_TIMEOUT_MS

MAGIC = b"VMFERRY\n"
# 2: one CONF schema for live migration and save files (flat, every key present), and
# one DEVS schema (identity and figures per device) in both.
VERSION = 2
STREAM_HEADER = struct.Struct("<8sII")
STREAM_HEADER_SIZE = STREAM_HEADER.size + 8
SECTION_HEADER = struct.Struct("<4sIQII")
SECTION_HEADER_SIZE = SECTION_HEADER.size + 8

CONF = b"CONF"  # machine config and migration set-up (JSON)
RAM = b"RAM\0"  # a batch of pages
ROUND = b"RND\0"  # end of a pre-copy round (JSON: round number and counts)
CPUS = b"CPUS"  # vCPU and VM state (JSON)
DEVD = b"DEVD"  # a chunk of one device's migration stream (pre-copy or stop-copy)
DEVS = b"DEVS"  # device summary (JSON list: identity and bytes per device)
VRFY = b"VRFY"  # page and CPU-state digests taken at switchover
END = b"END\0"  # the stream is complete
CHAN = b"CHAN"  # first section of an extra channel: which migration, which channel
CEND = b"CEND"  # an extra channel has sent all its pages
ABRT = b"ABRT"  # the source abandons the migration (JSON: reason, cancelled); nothing follows

SECTION_NAMES = {
    CONF: "CONF",
    RAM: "RAM",
    ROUND: "RND",
    CPUS: "CPUS",
    DEVD: "DEVD",
    DEVS: "DEVS",
    VRFY: "VRFY",
    END: "END",
    CHAN: "CHAN",
    CEND: "CEND",
    ABRT: "ABRT",
}
MAX_PAYLOAD = {
    CONF: 1 << 20,
    RAM: 1 << 30,
    ROUND: 1 << 16,
    CPUS: 16 << 20,
    DEVD: 16 << 20,
    DEVS: 1 << 20,
    VRFY: 1 << 30,
    END: 0,
    CHAN: 1 << 12,
    CEND: 1 << 12,
    ABRT: 1 << 12,
}
FLAG_ZSTD = 1  # the payload is one zstd frame
# The page data of this RAM section was read from a running guest, which may change a page
# while it is being sent: the checksum covers the header and the run table only. Such a
# page was dirtied, so it is sent again later; the switchover digests cover the end result.
# Only a live connection carries these: a file is read long after, with nothing resent and
# perhaps no digests, so its pre-copy pages are copied first and checksummed whole.
FLAG_LIVE = 2
KNOWN_FLAGS = FLAG_ZSTD | FLAG_LIVE

# RAM payload: head (run count, reserved), the run table, then the data of non-zero runs.
RAM_HEAD = struct.Struct("<II")
RUN_DTYPE = np.dtype([("first", "<u8"), ("npages", "<u4"), ("flags", "<u4")])
RUN_ZERO = 1  # a run of zero pages: no data follows for it
# DEVD payload: head, then a chunk of that device's own migration stream.
DEVD_HEAD = struct.Struct("<II")  # device index, phase
PHASE_PRECOPY, PHASE_STOP_COPY = 0, 1
# VRFY payload: head, then page numbers (<i8) and their digests (<u8).
VRFY_HEAD = struct.Struct("<QQQ")  # key seed, page count, cpu digest


def section_name(tag: bytes) -> str:
    return SECTION_NAMES.get(tag, repr(tag))


# ---- the stream header


def encode_stream_header() -> bytes:
    head = STREAM_HEADER.pack(MAGIC, VERSION, 0)
    return head + struct.pack("<Q", xxhash.xxh64_intdigest(head))


def check_stream_header(raw: bytes | bytearray) -> None:
    """Refuse what is not a vmferry stream of this format version."""
    magic, version, _flags = STREAM_HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise StreamError(f"not a vmferry stream: magic is {bytes(magic)!r}, want {MAGIC!r}")
    (check,) = struct.unpack_from("<Q", raw, STREAM_HEADER.size)
    if check != xxhash.xxh64_intdigest(bytes(raw[: STREAM_HEADER.size])):
        raise StreamError("stream header checksum mismatch: the header is corrupt")
    if version != VERSION:
        rel = "newer than" if version > VERSION else "older than"
        raise StreamError(
            f"stream format version {version} is {rel} this vmferry's ({VERSION}); "
            "use a matching vmferry"
        )


# ---- JSON fields, checked


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _load_object(payload: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StreamError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise StreamError(f"{where}: the payload is {type(obj).__name__}, want an object")
    return obj


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    # JSON true is no number of pages.
    return isinstance(value, kind) and not (isinstance(value, bool) and bool not in _types(kind))


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise StreamError(f"{where}: field {key!r} is missing")
    value = obj[key]
    if not _is(value, kind):
        want = " or ".join("null" if t is type(None) else t.__name__ for t in _types(kind))
        raise StreamError(f"{where}: field {key!r} is {value!r}, want {want}")
    return value


def _count(obj: dict[str, Any], key: str, where: str, lo: int = 0, hi: int = 1 << 63) -> int:
    n: int = _get(obj, key, int, where)
    if not lo <= n <= hi:
        raise StreamError(f"{where}: field {key!r} is {n}, want {lo}..{hi}")
    return n


# ---- sections


@dataclass(frozen=True)
class ConfigRecord:
    """CONF: the machine and the migration's set-up; a save file has one channel, no id."""

    config: MachineConfig
    mig_id: str = ""
    channels: int = 1
    resident: tuple[tuple[int, int], ...] = ()  # RAM ranges that hold data (pre-faulted)
    verify: bool = False
    devices: tuple[DeviceIdentity, ...] = ()
    peer_timeout_ms: int | None = None  # the source's x-peer-timeout (live only)

    def encode(self) -> bytes:
        return _json(
            {
                "config": self.config.to_dict(),
                "id": self.mig_id,
                "channels": self.channels,
                "resident": [list(r) for r in self.resident],
                "verify": self.verify,
                "devices": [d.to_dict() for d in self.devices],
                "peer-timeout-ms": self.peer_timeout_ms,
            }
        )

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = _load_object(payload, where)
        try:
            config = MachineConfig.from_dict(_get(obj, "config", dict, where))
            if config.memory > MAX_RAM:
                raise ValueError(
                    f"{config.memory} bytes of RAM is more than the 1 TiB vmferry runs"
                )
        except StreamError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, VmferryError) as e:
            raise StreamError(f"{where} holds no usable machine config: {e}") from e
        timeout = _get(obj, "peer-timeout-ms", (int, type(None)), where)
        if timeout is not None:
            _count(obj, "peer-timeout-ms", where, MIN_PEER_TIMEOUT_MS, MAX_PEER_TIMEOUT_MS)
        return cls(
            config,
            _get(obj, "id", str, where),
            _count(obj, "channels", where, 1, 255),
            _resident(_get(obj, "resident", list, where), config.memory, where),
            _get(obj, "verify", bool, where),
            _identities(_get(obj, "devices", list, where), where),
            timeout,
        )


def _resident(ranges: list[Any], size: int, where: str) -> tuple[tuple[int, int], ...]:
    out = []
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and all(_is(x, int) for x in r)):
            raise StreamError(f"{where}: field 'resident' holds {r!r}, want [start, end]")
        a, b = r
        if not 0 <= a < b <= size:
            raise StreamError(f"{where}: resident range {a}..{b} lies outside guest RAM ({size})")
        out.append((a, b))
    return tuple(out)


def _identities(devices: list[Any], where: str) -> tuple[DeviceIdentity, ...]:
    out = []
    for i, d in enumerate(devices):
        at = f"{where}, device {i}"
        if not isinstance(d, dict):
            raise StreamError(f"{at}: the identity is {d!r}, want an object")
        out.append(
            DeviceIdentity(
                _get(d, "model", str, at), _get(d, "version", int, at), _get(d, "config", dict, at)
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class ChannelRecord:
    """CHAN: which migration an extra channel belongs to, and its index."""

    mig_id: str
    index: int

    def encode(self) -> bytes:
        return _json({"id": self.mig_id, "index": self.index})

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = _load_object(payload, where)
        return cls(_get(obj, "id", str, where), _count(obj, "index", where, 1, 254))


@dataclass(frozen=True)
class RoundMarker:
    """RND: a pre-copy round (or the stop-and-copy) is out, with its page count."""

    round: int
    pages: int
    stop_copy: bool = False

    def encode(self) -> bytes:
        return _json({"round": self.round, "pages": self.pages, "stop-copy": self.stop_copy})

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = _load_object(payload, where)
        return cls(
            _count(obj, "round", where),
            _count(obj, "pages", where),
            _get(obj, "stop-copy", bool, where),
        )


@dataclass(frozen=True)
class CpuStateRecord:
    """CPUS: the VM clock and every vCPU's state."""

    clock: bytes
    vcpus: tuple[VcpuState, ...]

    @classmethod
    def of(cls, state: MachineState) -> Self:
        return cls(state.clock, tuple(state.vcpus))

    def machine_state(self, config: MachineConfig, where: str) -> MachineState:
        """The state of the VM ``config`` describes (the vCPUs must be its vCPUs)."""
        have = [v.index for v in self.vcpus]
        if have != list(range(config.vcpus)):
            raise StreamError(f"{where} has vCPUs {have}, config says {config.vcpus}")
        return MachineState(config, self.clock, list(self.vcpus))

    def encode(self) -> bytes:
        return _json({"clock": self.clock.hex(), "vcpus": [v.to_dict() for v in self.vcpus]})

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = _load_object(payload, where)
        try:
            clock = bytes.fromhex(_get(obj, "clock", str, where))
        except ValueError as e:
            raise StreamError(f"{where}: field 'clock' is not hex: {e}") from e
        vcpus = []
        for i, v in enumerate(_get(obj, "vcpus", list, where)):
            if not isinstance(v, dict):
                raise StreamError(f"{where}: vCPU {i} is {v!r}, want an object")
            try:
                vcpus.append(VcpuState.from_dict(v))
            except StreamError as e:
                raise StreamError(f"{where}: {e}") from e
        return cls(clock, tuple(vcpus))


# What DEVS says of each device: its identity (as in CONF) and its migration figures.
DEVICE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "version": int,
    "config": dict,
    "name": str,
    "dirty-tracking": str,
    "precopy-bytes": int,
    "stop-copy-bytes": int,
    "stop-copy-time": (int, float),
    "dma-dirty-pages": int,
}


@dataclass(frozen=True)
class DeviceSummary:
    """DEVS: per device, identity and figures; the same live and in save files."""

    devices: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, identities: list[dict[str, Any]], stats: list[dict[str, Any]]) -> Self:
        entries = tuple({**i, **s} for i, s in zip(identities, stats, strict=True))
        for n, e in enumerate(entries):
            _device_entry(e, f"DEVS, device {n}")  # a writer's bug, caught before it goes
        return cls(entries)

    def encode(self) -> bytes:
        return _json(list(self.devices))

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        try:
            devices = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StreamError(f"{where} is not valid JSON: {e}") from e
        if not isinstance(devices, list):
            raise StreamError(f"{where}: the payload is {type(devices).__name__}, want a list")
        return cls(tuple(_device_entry(d, f"{where}, device {n}") for n, d in enumerate(devices)))


def _device_entry(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise StreamError(f"{where}: the entry is {d!r}, want an object")
    for key, kind in DEVICE_FIELDS.items():
        _get(d, key, kind, where)
    return d


@dataclass(frozen=True)
class VerifyRecord:
    """VRFY: the key seed, the pages the source digested, their digests, the CPU digest."""

    seed: int
    pages: npt.NDArray[np.int64]
    digests: npt.NDArray[np.uint64]
    cpu: int

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, VerifyRecord)
            and (self.seed, self.cpu) == (other.seed, other.cpu)
            and np.array_equal(self.pages, other.pages)
            and np.array_equal(self.digests, other.digests)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays: compared, never hashed

    def encode(self) -> list[bytes]:
        return [
            VRFY_HEAD.pack(self.seed, self.pages.size, self.cpu),
            self.pages.astype("<i8").tobytes(),
            self.digests.astype("<u8").tobytes(),
        ]

    @classmethod
    def decode(cls, payload: bytes, where: str, npages_ram: int) -> Self:
        if len(payload) < VRFY_HEAD.size:
            raise StreamError(f"{where}: {len(payload)} bytes is too short for its head")
        seed, count, cpu = VRFY_HEAD.unpack_from(payload)
        if len(payload) != VRFY_HEAD.size + 16 * count:
            raise StreamError(f"{where} has {len(payload)} bytes for {count} pages")
        pages = np.frombuffer(payload, dtype="<i8", count=count, offset=VRFY_HEAD.size)
        digests = np.frombuffer(
            payload, dtype="<u8", count=count, offset=VRFY_HEAD.size + 8 * count
        )
        if count and (pages.min() < 0 or pages.max() >= npages_ram or (np.diff(pages) <= 0).any()):
            raise StreamError(f"{where} lists pages outside guest RAM or out of order")
        return cls(seed, pages.astype(np.int64), digests.astype(np.uint64), cpu)


@dataclass(frozen=True)
class AbandonNotice:
    """ABRT: why the source gave up; nothing follows it."""

    reason: str
    cancelled: bool = False

    def encode(self) -> bytes:
        return _json({"reason": self.reason, "cancelled": self.cancelled})

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = _load_object(payload, where)
        return cls(_get(obj, "reason", str, where), _get(obj, "cancelled", bool, where))


def check_empty(payload: bytes, where: str) -> None:
    """END and CEND carry nothing."""
    if payload:
        raise StreamError(f"{where}: {len(payload)} bytes where nothing belongs")


# ---- the reply path: one JSON object per line, against the stream's direction


@dataclass(frozen=True)
class Accepted:
    """The destination checked the VM and its devices: pages may come."""

    KIND: ClassVar[str] = "accepted"


@dataclass(frozen=True)
class Ready:
    """Loaded and verified, not running: the source may say go."""

    KIND: ClassVar[str] = "ready"
    verify_ms: float
    pages_checked: int
    verify: str  # the check's status: passed, off


@dataclass(frozen=True)
class Go:
    """The source hands over: it never runs the VM again."""

    KIND: ClassVar[str] = "go"


@dataclass(frozen=True)
class Resumed:
    KIND: ClassVar[str] = "resumed"
    resume_ms: float


@dataclass(frozen=True)
class Failed:
    """The destination gives up; ``verify``: what its check found, when that was why."""

    KIND: ClassVar[str] = "failed"
    error: str
    verify: dict[str, Any] | None = None


@dataclass(frozen=True)
class Abandon:
    """The source gives up after END is out (before, it sends an ABRT section)."""

    KIND: ClassVar[str] = "abandon"
    reason: str
    cancelled: bool = False


@dataclass(frozen=True)
class Alive:
    """The destination's heartbeat."""

    KIND: ClassVar[str] = "alive"


ReplyMessage = Accepted | Ready | Go | Resumed | Failed | Abandon | Alive
_REPLIES: dict[str, type[ReplyMessage]] = {
    c.KIND: c for c in (Accepted, Ready, Go, Resumed, Failed, Abandon, Alive)
}
# Each field's JSON type; absent from a message: None (Failed.verify only).
_REPLY_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ready": {"verify_ms": (int, float), "pages_checked": int, "verify": str},
    "resumed": {"resume_ms": (int, float)},
    "failed": {"error": str},
    "abandon": {"reason": str, "cancelled": bool},
}


def encode_reply(msg: ReplyMessage) -> bytes:
    fields = {k: v for k, v in vars(msg).items() if v is not None}
    return json.dumps({"kind": msg.KIND, **fields}).encode() + b"\n"


def decode_reply(line: bytes) -> ReplyMessage:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MigrationError(f"the peer sent a malformed reply: {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise MigrationError(f"the peer sent a malformed reply: {line[:200]!r} has no kind")
    kind = obj["kind"]
    cls = _REPLIES.get(kind)
    if cls is None:
        raise MigrationError(f"the peer sent an unknown reply kind {kind[:50]!r}")
    where = f"{kind!r} reply"
    try:
        values = {k: _get(obj, k, t, where) for k, t in _REPLY_FIELDS.get(kind, {}).items()}
        if cls is Failed:
            values["verify"] = obj.get("verify")
            if not isinstance(values["verify"], dict | None):
                raise StreamError(f"{where}: field 'verify' is {values['verify']!r}, want object")
        if cls is Ready:
            _count(obj, "pages_checked", where)
    except StreamError as e:
        raise MigrationError(f"the peer sent a malformed reply: {e}") from e
    return cls(**values)
