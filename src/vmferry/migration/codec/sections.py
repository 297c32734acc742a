"""The sections' records: each payload's typed form, ``encode``, and ``decode`` that
validates and raises a StreamError naming the section and the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.devices.base import DeviceIdentity
from vmferry.errors import StreamError, VmferryError
from vmferry.machine.config import MachineConfig
from vmferry.machine.state import MachineState, VcpuState
from vmferry.memory.guest_memory import MAX_RAM
from vmferry.migration.codec.fields import count, dump_json, get, is_a, load_json, load_object
from vmferry.migration.codec.layout import AUDIT_HEAD, MAX_AUDIT_PAGES, VRFY_HEAD
from vmferry.migration.params import MAX_PEER_TIMEOUT_MS, MIN_PEER_TIMEOUT_MS, VERIFY_MODES


@dataclass(frozen=True)
class ConfigRecord:
    """CONF: the machine and the migration's set-up; a save file has one channel, no id."""

    config: MachineConfig
    mig_id: str = ""
    channels: int = 1
    resident: tuple[tuple[int, int], ...] = ()  # RAM ranges that hold data (pre-faulted)
    verify: str = "off"  # x-verify: on | strict | off
    devices: tuple[DeviceIdentity, ...] = ()
    peer_timeout_ms: int | None = None  # the source's x-peer-timeout (live only)
    # The page-digest keys' seed: known from the start, the destination digests pages as
    # they land (x-verify on).
    verify_seed: int = 0
    hold_output: bool = False  # x-verify-hold-output: the VF's frames held until the audit

    def encode(self) -> bytes:
        return dump_json(
            {
                "config": self.config.to_dict(),
                "id": self.mig_id,
                "channels": self.channels,
                "resident": [list(r) for r in self.resident],
                "verify": self.verify,
                "devices": [d.to_dict() for d in self.devices],
                "peer-timeout-ms": self.peer_timeout_ms,
                "verify-seed": self.verify_seed,
                "verify-hold-output": self.hold_output,
            }
        )

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = load_object(payload, where)
        try:
            config = MachineConfig.from_dict(get(obj, "config", dict, where))
            if config.memory > MAX_RAM:
                raise ValueError(
                    f"{config.memory} bytes of RAM is more than the 1 TiB vmferry runs"
                )
        except StreamError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, VmferryError) as e:
            raise StreamError(f"{where} holds no usable machine config: {e}") from e
        timeout = get(obj, "peer-timeout-ms", (int, type(None)), where)
        if timeout is not None:
            count(obj, "peer-timeout-ms", where, MIN_PEER_TIMEOUT_MS, MAX_PEER_TIMEOUT_MS)
        verify = get(obj, "verify", str, where)
        if verify not in VERIFY_MODES:
            raise StreamError(f"{where}: field 'verify' is {verify[:20]!r}, want on, strict or off")
        return cls(
            config,
            get(obj, "id", str, where),
            count(obj, "channels", where, 1, 255),
            _resident(get(obj, "resident", list, where), config.memory, where),
            verify,
            _identities(get(obj, "devices", list, where), where),
            timeout,
            count(obj, "verify-seed", where, 0, (1 << 64) - 1),
            get(obj, "verify-hold-output", bool, where),
        )


def _resident(ranges: list[Any], size: int, where: str) -> tuple[tuple[int, int], ...]:
    out = []
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and all(is_a(x, int) for x in r)):
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
                get(d, "model", str, at), get(d, "version", int, at), get(d, "config", dict, at)
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class ChannelRecord:
    """CHAN: which migration an extra channel belongs to, and its index."""

    mig_id: str
    index: int

    def encode(self) -> bytes:
        return dump_json({"id": self.mig_id, "index": self.index})

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = load_object(payload, where)
        return cls(get(obj, "id", str, where), count(obj, "index", where, 1, 254))


@dataclass(frozen=True)
class RoundMarker:
    """RND: a pre-copy round (or the stop-and-copy) is out, with its page count."""

    round: int
    pages: int
    stop_copy: bool = False

    def encode(self) -> bytes:
        return dump_json({"round": self.round, "pages": self.pages, "stop-copy": self.stop_copy})

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = load_object(payload, where)
        return cls(
            count(obj, "round", where),
            count(obj, "pages", where),
            get(obj, "stop-copy", bool, where),
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
        return dump_json({"clock": self.clock.hex(), "vcpus": [v.to_dict() for v in self.vcpus]})

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = load_object(payload, where)
        try:
            clock = bytes.fromhex(get(obj, "clock", str, where))
        except ValueError as e:
            raise StreamError(f"{where}: field 'clock' is not hex: {e}") from e
        vcpus = []
        for i, v in enumerate(get(obj, "vcpus", list, where)):
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
        return dump_json(list(self.devices))

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        devices = load_json(payload, where)
        if not isinstance(devices, list):
            raise StreamError(f"{where}: the payload is {type(devices).__name__}, want a list")
        return cls(tuple(_device_entry(d, f"{where}, device {n}") for n, d in enumerate(devices)))


def _device_entry(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise StreamError(f"{where}: the entry is {d!r}, want an object")
    for key, kind in DEVICE_FIELDS.items():
        get(d, key, kind, where)
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
class AuditChunk:
    """The audit after resume (x-verify on): the source's digests of pages [first,
    first + count), every page of that range in order (a hole's is 0, as a zero page's
    is), with an xxh64 of the digests; it goes on the reply path after ``resumed``, each
    chunk behind an ``audit`` line that gives its length (replies.Audit)."""

    first: int
    digests: npt.NDArray[np.uint64]
    last: bool = False  # the chunk that reaches the end of guest RAM

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, AuditChunk)
            and (self.first, self.last) == (other.first, other.last)
            and np.array_equal(self.digests, other.digests)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays: compared, never hashed

    def encode(self, npages_ram: int) -> bytes:
        body = self.digests.astype("<u8").tobytes()
        head = AUDIT_HEAD.pack(
            self.first, self.digests.size, npages_ram, xxhash.xxh64_intdigest(body)
        )
        return head + body

    @classmethod
    def decode(cls, payload: bytes, where: str, npages_ram: int) -> Self:
        if len(payload) < AUDIT_HEAD.size:
            raise StreamError(f"{where}: {len(payload)} bytes is too short for its head")
        first, n, ram, check = AUDIT_HEAD.unpack_from(payload)
        if ram != npages_ram:
            raise StreamError(f"{where} is for a guest of {ram} pages, this one has {npages_ram}")
        if n > MAX_AUDIT_PAGES:
            raise StreamError(f"{where} holds {n} digests: at most {MAX_AUDIT_PAGES} per chunk")
        if n == 0 or first + n > npages_ram:
            raise StreamError(f"{where}: pages {first}+{n} lie outside guest RAM ({npages_ram})")
        if len(payload) != AUDIT_HEAD.size + 8 * n:
            raise StreamError(f"{where} has {len(payload)} bytes for {n} digests")
        body = payload[AUDIT_HEAD.size :]
        if xxhash.xxh64_intdigest(body) != check:
            raise StreamError(f"{where}: the digests' checksum does not match (corrupt)")
        digests = np.frombuffer(body, dtype="<u8").astype(np.uint64)
        return cls(first, digests, first + n == npages_ram)


@dataclass(frozen=True)
class AbandonNotice:
    """ABRT: why the source gave up; nothing follows it."""

    reason: str
    cancelled: bool = False

    def encode(self) -> bytes:
        return dump_json({"reason": self.reason, "cancelled": self.cancelled})

    @classmethod
    def decode(cls, payload: bytes, where: str) -> Self:
        obj = load_object(payload, where)
        return cls(get(obj, "reason", str, where), get(obj, "cancelled", bool, where))


def check_empty(payload: bytes, where: str) -> None:
    """END and CEND carry nothing."""
    if payload:
        raise StreamError(f"{where}: {len(payload)} bytes where nothing belongs")
