"""The reply path: one JSON object per line, against the stream's direction, each a
``ReplyMessage``; ``decode_reply`` checks every field (figures finite and not negative,
a failed check's findings whole) and refuses anything else as a malformed reply."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from vmferry.errors import MigrationError, StreamError
from vmferry.migration.codec.fields import count, figure, get, is_a, load_json
from vmferry.migration.codec.layout import AUDIT_HEAD, MAX_AUDIT_PAGES

# The most page numbers a failed check reports (verify.MAX_MISMATCHES_REPORTED is 16).
MAX_FINDINGS_PAGES = 1024


class VerifyFindings(dict[str, Any]):
    """What the destination's check found, when that was why it refused the VM: status,
    pages_checked, mismatched_pages (page numbers), cpu_state, detail, each checked.

    A dict of exactly those keys (the form the source's figures read and its error
    carries on), with typed properties; built only by ``of``, which validates."""

    @classmethod
    def of(cls, found: Mapping[str, Any], where: str = "the check's findings") -> Self:
        """The findings in ``found``; a StreamError naming the field if one is malformed."""
        obj = dict(found)
        pages = get(obj, "mismatched_pages", (list, tuple), where)
        if len(pages) > MAX_FINDINGS_PAGES or not all(
            is_a(p, int) and 0 <= p < 1 << 63 for p in pages
        ):
            raise StreamError(
                f"{where}: field 'mismatched_pages' is not a list of at most "
                f"{MAX_FINDINGS_PAGES} page numbers"
            )
        out = cls()
        out.update(
            status=get(obj, "status", str, where),
            pages_checked=count(obj, "pages_checked", where),
            mismatched_pages=[int(p) for p in pages],
            cpu_state=get(obj, "cpu_state", str, where),
            detail=get(obj, "detail", str, where),
        )
        return out

    @property
    def status(self) -> str:
        return str(self["status"])

    @property
    def pages_checked(self) -> int:
        return int(self["pages_checked"])

    @property
    def mismatched_pages(self) -> list[int]:
        return list(self["mismatched_pages"])

    @property
    def cpu_state(self) -> str:
        return str(self["cpu_state"])

    @property
    def detail(self) -> str:
        return str(self["detail"])

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


@dataclass(frozen=True)
class Accepted:
    """The destination checked the VM and its devices: pages may come. ``postcopy``: why
    it cannot take a switch to post-copy ("" if it can; said only when it cannot)."""

    KIND: ClassVar[str] = "accepted"
    postcopy: str = ""


@dataclass(frozen=True)
class Ready:
    """Loaded and verified, not running: the source may say go."""

    KIND: ClassVar[str] = "ready"
    verify_ms: float
    pages_checked: int
    verify: str  # the check's status: passed, off
    drain_ms: float = 0.0  # of verify_ms: the landing digests' drain after END (x-verify on)


@dataclass(frozen=True)
class Go:
    """The source hands over: it never runs the VM again."""

    KIND: ClassVar[str] = "go"


@dataclass(frozen=True)
class Resumed:
    KIND: ClassVar[str] = "resumed"
    resume_ms: float


@dataclass(frozen=True, init=False)
class Failed:
    """The destination gives up; ``verify``: what its check found, when that was why
    (given as any mapping of the five fields, kept as checked VerifyFindings);
    ``started``: it had started the guest (after "go"), so the source must not run it
    again: the VM may have run there."""

    KIND: ClassVar[str] = "failed"
    error: str
    verify: VerifyFindings | None
    started: bool

    def __init__(
        self, error: str, verify: Mapping[str, Any] | None = None, started: bool = False
    ) -> None:
        object.__setattr__(self, "error", error)
        object.__setattr__(self, "verify", None if verify is None else VerifyFindings.of(verify))
        object.__setattr__(self, "started", started)


@dataclass(frozen=True)
class Abandon:
    """The source gives up after END is out (before, it sends an ABRT section)."""

    KIND: ClassVar[str] = "abandon"
    reason: str
    cancelled: bool = False


@dataclass(frozen=True)
class Audit:
    """The source's: an audit chunk (sections.AuditChunk) of ``bytes`` bytes follows this
    line on the reply path, binary."""

    KIND: ClassVar[str] = "audit"
    bytes: int


@dataclass(frozen=True)
class Audited:
    """The destination's verdict on the audit after resume. ``failed``: it has stopped
    its VM (vCPUs and devices) and discards it, so the source may run the VM again."""

    KIND: ClassVar[str] = "audited"
    status: str  # passed | failed
    pages_checked: int
    audit_ms: float
    mismatched_pages: list[int]
    detail: str = ""


@dataclass(frozen=True)
class Landed:
    """Post-copy: every owed page has landed at the destination (its figures, ms)."""

    KIND: ClassVar[str] = "landed"
    pages: int  # pages that arrived after the switch
    requests: int  # page requests it sent
    blocktime_ms: float  # every vCPU waiting at once (QEMU's postcopy-blocktime)
    latency_p50_ms: float = 0.0  # a fault's wait, from its read to its page's landing
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    vcpu_blocktime_ms: tuple[float, ...] = ()  # per vCPU (QEMU's postcopy-vcpu-blocktime)


@dataclass(frozen=True)
class Alive:
    """The destination's heartbeat."""

    KIND: ClassVar[str] = "alive"


ReplyMessage = Accepted | Ready | Go | Resumed | Failed | Abandon | Alive | Audit | Audited | Landed
_REPLIES: dict[str, type[ReplyMessage]] = {
    c.KIND: c
    for c in (Accepted, Ready, Go, Resumed, Failed, Abandon, Alive, Audit, Audited, Landed)
}
# The most bytes an ``audit`` line may announce: one chunk's head and digests.
MAX_AUDIT_BYTES = AUDIT_HEAD.size + 8 * MAX_AUDIT_PAGES
# Each field's JSON type; absent from a message: None (Failed.verify only). Figures
# (milliseconds) are checked apart: finite, not negative.
_REPLY_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ready": {"pages_checked": int, "verify": str},
    "failed": {"error": str},
    "abandon": {"reason": str, "cancelled": bool},
    "audited": {"status": str, "detail": str},
}
_REPLY_FIGURES: dict[str, tuple[str, ...]] = {
    "ready": ("verify_ms",),
    "resumed": ("resume_ms",),
    "audited": ("audit_ms",),
    "landed": ("blocktime_ms", "latency_p50_ms", "latency_p99_ms", "latency_max_ms"),
}


def encode_reply(msg: ReplyMessage) -> bytes:
    fields = {k: v for k, v in vars(msg).items() if v is not None}
    if isinstance(msg, Failed) and not msg.started:
        del fields["started"]  # said only when true: a "failed" as it always was
    if isinstance(msg, Accepted) and not msg.postcopy:
        del fields["postcopy"]  # said only when it cannot: an "accepted" as it always was
    return json.dumps({"kind": msg.KIND, **fields}, allow_nan=False).encode() + b"\n"


def decode_reply(line: bytes) -> ReplyMessage:
    try:
        obj = load_json(line, "the reply")
    except StreamError as e:
        raise MigrationError(f"the peer sent a malformed reply: {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise MigrationError(f"the peer sent a malformed reply: {line[:200]!r} has no kind")
    kind = obj["kind"]
    cls = _REPLIES.get(kind)
    if cls is None:
        raise MigrationError(f"the peer sent an unknown reply kind {kind[:50]!r}")
    try:
        return cls(**_reply_values(cls, obj, f"{kind!r} reply"))
    except StreamError as e:
        raise MigrationError(f"the peer sent a malformed reply: {e}") from e


def _reply_values(cls: type[ReplyMessage], obj: dict[str, Any], where: str) -> dict[str, Any]:
    kind = cls.KIND
    values: dict[str, Any] = {k: figure(obj, k, where) for k in _REPLY_FIGURES.get(kind, ())}
    values.update({k: get(obj, k, t, where) for k, t in _REPLY_FIELDS.get(kind, {}).items()})
    if cls is Ready:
        count(obj, "pages_checked", where)
        values["drain_ms"] = figure(obj, "drain_ms", where) if "drain_ms" in obj else 0.0
    if cls is Landed:
        values["pages"] = count(obj, "pages", where)
        values["requests"] = count(obj, "requests", where)
        per = obj.get("vcpu_blocktime_ms", [])
        if not isinstance(per, list) or len(per) > 1024:
            raise StreamError(f"{where}: field 'vcpu_blocktime_ms' is not a list of figures")
        values["vcpu_blocktime_ms"] = tuple(
            figure({"ms": x}, "ms", f"{where}, field 'vcpu_blocktime_ms'") for x in per
        )
    if cls is Audit:
        values["bytes"] = count(obj, "bytes", where, 1, MAX_AUDIT_BYTES)
    if cls is Audited:
        if values["status"] not in ("passed", "failed"):
            raise StreamError(f"{where}: field 'status' is {values['status'][:20]!r}")
        found = VerifyFindings.of({**obj, "cpu_state": ""}, where)
        values["pages_checked"] = found.pages_checked
        values["mismatched_pages"] = found.mismatched_pages
    if cls is Accepted and "postcopy" in obj:
        values["postcopy"] = get(obj, "postcopy", str, where)[:500]
    if cls is Failed:
        values["started"] = get(obj, "started", bool, where) if "started" in obj else False
    if cls is Failed and obj.get("verify") is not None:
        found = obj["verify"]
        if not isinstance(found, dict):
            raise StreamError(f"{where}: field 'verify' is {found!r:.80}, want object")
        values["verify"] = VerifyFindings.of(found, f"{where}, field 'verify'")
    return values
