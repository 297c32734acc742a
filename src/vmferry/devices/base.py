"""The device contract: what a device model implements, and the migration framework
around it (the VFIO migration v2 semantics every device shares).

A model implements a handful of hooks — its registers, one direct FSM arc at a time, its
saved pieces and how to load them back — in the way libvfio-user devices implement three
callbacks. :class:`DeviceModel` walks multi-hop requests along ``fsm.path``, keeps the
saving and resuming stream sessions, frames the pieces, answers PRECOPY_INFO and the
stop-copy size, and implements VFIO DMA logging on top of the IOMMU's write reports.
"""

from __future__ import annotations

import enum
import itertools
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from vmferry.devices import fsm
from vmferry.devices.fsm import FsmError, MigCap, MigState
from vmferry.devices.iommu import DirtyTracking, Iommu, cover_ranges
from vmferry.devices.stream import (
    PIECE_DIRTY,
    PIECE_FINAL,
    PIECE_INITIAL,
    Chunk,
    DeviceStreamError,
    ResumingStream,
    SavingStream,
    framed_size,
)
from vmferry.memory.dirty import bits_set
from vmferry.sizes import parse_size

# What QEMU assumes when a device cannot say how big its stop-copy data is: never
# under-estimate downtime.
UNKNOWN_STOP_COPY_SIZE = 100 << 30
DMA_LOG_MAX_RANGES = 256  # VFIO_DEVICE_FEATURE_DMA_LOGGING_START's limit
# Put in a device's options by the registry, never by ``--device`` (which refuses keys it
# does not know), when the device is built to take over a migrating VM's: a host resource
# the source still holds (a vGPU) may then be shared until the source lets go.
INCOMING_OPTION = "_incoming"
# ``--device …,x-dma-log-page=2M``: the device logs its DMA in blocks this big, whatever
# page size the engine asks for (VFIO lets a device choose; tests of coarse logs).
DMA_LOG_PAGE_OPTION = "x-dma-log-page"


class DeviceError(DeviceStreamError):
    """A device refused an operation or could not complete a transition."""


class OutputGate(enum.Enum):
    """What becomes of what a device sends to the outside (``x-verify-hold-output``):
    held while the destination's post-resume audit runs, then released or dropped."""

    HOLD = "hold"  # keep it from now on (the guest is about to start here)
    RELEASE = "release"  # the audit passed: send what was kept, in order, and stop keeping
    DROP = "drop"  # the audit failed (the VM goes back to its source): discard it all


@dataclass(frozen=True)
class DeviceIdentity:
    """What the destination checks at setup: same model, same version, same configuration."""

    model: str
    version: int
    config: dict[str, Any] = field(default_factory=dict)

    def incompatibility(self, other: DeviceIdentity) -> str | None:
        if self.model != other.model:
            return f"model {other.model!r} here, {self.model!r} on the source"
        if self.version != other.version:
            return f"{self.model} version {other.version} here, {self.version} on the source"
        if self.config != other.config:
            return f"{self.model} configuration {other.config} here, {self.config} on the source"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "config": self.config}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceIdentity:
        return cls(str(d["model"]), int(d["version"]), dict(d.get("config", {})))


class DeviceModel(ABC):
    """A migratable device. Subclasses implement the hooks marked abstract."""

    model: ClassVar[str]
    version: ClassVar[int]
    caps: ClassVar[MigCap]
    mmio_size: ClassVar[int] = 0x1000
    # ``--device MODEL,key=value`` options this model takes besides the common ones.
    model_options: ClassVar[frozenset[str]] = frozenset()
    # DMA dirty-tracking modes this model supports (``mediated`` needs a mediator).
    tracking_modes: ClassVar[frozenset[DirtyTracking]] = frozenset(
        {DirtyTracking.IOMMU, DirtyTracking.DEVICE, DirtyTracking.NONE, DirtyTracking.BROKEN}
    )

    def __init__(self, name: str, iommu: Iommu, options: dict[str, str]) -> None:
        self.name = name
        self.iommu = iommu
        self.options = options
        self.state = MigState.RUNNING
        self._lock = threading.RLock()
        self._saving: SavingStream | None = None
        self._resuming: ResumingStream | None = None
        self._staged: list[tuple[bytes, bytes]] = []
        self.fail_arcs: set[tuple[MigState, MigState]] = set()  # fault injection (tests)
        self._dma_log: DmaLog | None = None
        if iommu.mode is DirtyTracking.DEVICE:
            iommu.device_logger = self._log_dma_write
        if not iommu.name:
            iommu.name = name  # its DMA errors (a page gate's timeout) name the device
        self.stats = {"precopy_bytes": 0, "stop_copy_bytes": 0}

    def close(self) -> None:  # noqa: B027 - optional hook: most models have no threads
        """Stop the device's threads (the machine is going away)."""

    def gate_output(self, gate: OutputGate) -> None:  # noqa: B027 - optional hook
        """Hold, release or drop what the device sends outside the VM (a NIC's transmit)
        and count it in ``stats``. A device with no output of its own has nothing to do:
        its DMA stays inside guest RAM, which the audit checks."""

    # ---- identity and registers (hooks)
    @property
    def identity(self) -> DeviceIdentity:
        version = int(self.options.get("x-version", self.version))
        return DeviceIdentity(self.model, version, self.config())

    def config(self) -> dict[str, Any]:
        """The configuration a destination must match (e.g. sizes), not runtime state."""
        return {}

    @abstractmethod
    def mmio_read(self, offset: int, size: int) -> int: ...

    @abstractmethod
    def mmio_write(self, offset: int, size: int, value: int) -> None: ...

    @abstractmethod
    def device_reset(self) -> None:
        """Back to power-on state: no work in flight, registers at their defaults."""

    @abstractmethod
    def on_arc(self, cur: MigState, nxt: MigState) -> None:
        """Do the device's part of one direct arc (quiesce, stop, resume, …)."""

    @abstractmethod
    def save_initial(self) -> Chunk | list[Chunk]:
        """Pre-copy initial data (entering PRE_COPY): what can move while it runs. A list
        makes one piece per element (at most 64 MiB each); views of device memory are
        copied only as they are read."""

    def save_dirty(self) -> Chunk | list[Chunk]:
        """Internal state changed since it was last saved; empty if none."""
        return b""

    def dirty_estimate(self) -> int:
        return 0

    def mediated_dirty_pages(self) -> npt.NDArray[np.int64]:
        """``mediated`` tracking: RAM pages (RAM offset / 4096) the device has written or
        is about to write since the last call, known from what the mediator parsed;
        the engine calls it at every sync."""
        raise DeviceError(f"{self.name} has no mediator to report its DMA")

    @abstractmethod
    def save_final(self) -> Chunk | list[Chunk]:
        """Everything else, with the device stopped (entering STOP_COPY)."""

    def final_estimate(self) -> int | None:
        """Bytes ``save_final`` will produce; None if the device cannot say."""
        return None

    def load(self, pieces: list[tuple[bytes, bytes]]) -> None:
        """Take the state back from the pieces of a resuming stream (INIT…, DIRT…, FINL);
        raise DeviceError if they are inconsistent. Devices with big state override
        ``accept_piece`` and ``finish_load`` instead, to stage pieces as they come."""
        raise NotImplementedError

    def accept_piece(self, kind: bytes, data: bytes) -> None:
        """One complete piece of the resuming stream (default: keep it for ``load``)."""
        self._staged.append((kind, data))

    def finish_load(self) -> None:
        """The stream is complete (RESUMING→STOP): apply it, or raise DeviceError."""
        pieces, self._staged = self._staged, []
        self.load(pieces)

    # ---- the FSM walk (framework)
    def set_state(self, target: MigState) -> None:
        """VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: walk hop by hop to ``target``.

        A failed hop leaves the device where the walk stopped, or in ERROR if the device
        could not undo its half-done arc."""
        with self._lock:
            for nxt in fsm.path(self.caps, self.state, target):
                self._hop(nxt)

    def _hop(self, nxt: MigState) -> None:
        cur = self.state
        arc = (cur, nxt)
        try:
            if arc in self.fail_arcs:
                raise DeviceError(f"{self.name}: injected failure on {cur.name}→{nxt.name}")
            self.on_arc(cur, nxt)
        except DeviceError:
            raise
        except Exception as e:
            self.state = MigState.ERROR
            self._saving = self._resuming = None
            raise DeviceError(f"{self.name}: {cur.name}→{nxt.name} failed: {e}") from e
        if fsm.opens_saving(arc):
            self._saving = SavingStream()
        if fsm.closes_saving(arc):
            self._saving = None
        if nxt in (MigState.PRE_COPY, MigState.PRE_COPY_P2P) and fsm.opens_saving(arc):
            self._push(PIECE_INITIAL, self.save_initial(), initial=True)
        if nxt is MigState.STOP_COPY and self._saving is not None:
            self._push(PIECE_FINAL, self.save_final())
        if fsm.opens_resuming(arc):
            self._staged = []
            self._resuming = ResumingStream(self.accept_piece, self.name)
        if fsm.commits_resuming(arc):
            stream, self._resuming = self._resuming, None
            try:
                if stream is None:
                    raise DeviceError(f"{self.name}: no resuming stream to commit")
                stream.check_complete()
                self.finish_load()
            except DeviceStreamError as e:
                self._staged = []
                raise DeviceError(f"{e}; the device keeps its previous state") from e
        self.state = nxt

    def _push(self, kind: bytes, data: Chunk | list[Chunk], *, initial: bool = False) -> None:
        assert self._saving is not None
        parts = data if isinstance(data, list) else [data]
        for part in parts:
            self._saving.push(kind, part, initial=initial)

    def reset(self) -> None:
        """VFIO reset: leaves ERROR for RUNNING; open streams are invalidated."""
        with self._lock:
            self._saving = self._resuming = None
            self._staged = []
            self.device_reset()
            self.state = MigState.RUNNING

    # ---- streams (framework)
    def read_data(self, max_bytes: int = 1 << 20) -> bytes | None:
        """Read the saving stream. In PRE_COPY: None means "nothing now" (ENOMSG), more may
        come later. In STOP_COPY: b'' is the end."""
        with self._lock:
            stream = self._saving
            if stream is None:
                raise DeviceError(f"{self.name}: no saving stream in state {self.state.name}")
            precopy = self.state in (MigState.PRE_COPY, MigState.PRE_COPY_P2P)
            if not stream.pending and precopy:
                dirty = self.save_dirty()
                if len(dirty) if isinstance(dirty, list) else memoryview(dirty).nbytes:
                    self._push(PIECE_DIRTY, dirty)
            if not stream.pending:
                return None if precopy else b""
            out = stream.read(max_bytes)
            key = "precopy_bytes" if precopy else "stop_copy_bytes"
            self.stats[key] += len(out)
            return out

    def write_data(self, data: Chunk) -> None:
        with self._lock:
            if self._resuming is None:
                raise DeviceError(f"{self.name}: not resuming (state {self.state.name})")
            self._resuming.feed(data)

    def precopy_info(self) -> tuple[int, int]:
        """VFIO_MIG_GET_PRECOPY_INFO: (initial_bytes, dirty_bytes); only in pre-copy."""
        with self._lock:
            if self.state not in (MigState.PRE_COPY, MigState.PRE_COPY_P2P):
                raise DeviceError(f"{self.name}: PRECOPY_INFO in state {self.state.name}")
            assert self._saving is not None
            initial = self._saving.initial_left
            return initial, self._saving.pending - initial + self.dirty_estimate()

    def stop_copy_size(self) -> int:
        """VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: the stop-copy estimate (huge if unknown)."""
        est = self.final_estimate()
        return UNKNOWN_STOP_COPY_SIZE if est is None else framed_size(est)

    # ---- DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_START / REPORT / STOP)
    def dma_log_page_size(self, requested: int) -> int:
        """The granularity this device logs DMA at: VFIO's page_size is a hint, and the
        device answers with the one it chose (``x-dma-log-page``, else the request)."""
        chosen = self.options.get(DMA_LOG_PAGE_OPTION)
        return requested if chosen is None else parse_size(chosen)

    def dma_logging_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        """Start logging DMA writes within ``ranges`` (IOVA, length); returns the page size
        the device chose (it may pick its own: see dma_log_page_size)."""
        if self.iommu.mode is not DirtyTracking.DEVICE:
            raise DeviceError(
                f"{self.name} does not log its own DMA (tracking is {self.iommu.mode.value})"
            )
        if not ranges or len(ranges) > DMA_LOG_MAX_RANGES:
            raise DeviceError(f"{self.name}: DMA logging takes 1 to {DMA_LOG_MAX_RANGES} ranges")
        if page_size < 4096 or page_size & (page_size - 1):
            raise DeviceError(f"{self.name}: DMA logging page size {page_size} is invalid")
        s = sorted(ranges)
        for (a, n), (b, _) in itertools.pairwise(s):
            if a + n > b:
                raise DeviceError(f"{self.name}: DMA logging ranges overlap at {b:#x}")
        if any(a % page_size or n % page_size or n <= 0 for a, n in s):
            raise DeviceError(f"{self.name}: DMA logging ranges must be page aligned")
        chosen = self.dma_log_page_size(page_size)
        if chosen < 4096 or chosen & (chosen - 1):
            raise DeviceError(f"{self.name}: DMA log page size {chosen} is not a power of 2 ≥ 4096")
        # A device logging coarser blocks tracks them whole: the ranges widen to them.
        self._dma_log = DmaLog(cover_ranges(s, chosen), chosen)
        return chosen

    def dma_logging_report(self, iova: int, length: int) -> npt.NDArray[np.uint64]:
        """Bitmap of pages written in [iova, iova+length) (bit k = page k), read-and-clear."""
        log = self._dma_log
        if log is None:
            raise DeviceError(f"{self.name}: DMA logging is not started")
        return log.report(iova, length)

    def dma_logging_stop(self) -> None:
        self._dma_log = None

    def _log_dma_write(self, iova: int, length: int) -> None:
        log = self._dma_log
        if log is not None:
            log.record(iova, length)


class DmaLog:
    """The device's own write log: a bitmap per range, page size chosen at start."""

    def __init__(self, ranges: list[tuple[int, int]], page_size: int) -> None:
        self.page_size = page_size
        self.ranges = ranges
        self._bits = [np.zeros((n // page_size + 63) // 64, dtype=np.uint64) for _, n in ranges]
        self._lock = threading.Lock()

    def record(self, iova: int, length: int) -> None:
        ps = self.page_size
        with self._lock:
            for (a, n), bits in zip(self.ranges, self._bits, strict=True):
                lo, hi = max(iova, a), min(iova + length, a + n)
                if lo >= hi:
                    continue
                pages = np.arange((lo - a) // ps, (hi - 1 - a) // ps + 1, dtype=np.uint64)
                np.bitwise_or.at(
                    bits, pages >> np.uint64(6), np.uint64(1) << (pages & np.uint64(63))
                )

    def report(self, iova: int, length: int) -> npt.NDArray[np.uint64]:
        ps = self.page_size
        if iova % ps or length % ps or length <= 0:
            raise DeviceError(f"DMA log report {iova:#x}+{length:#x} is not page aligned")
        npages = length // ps
        out = np.zeros((npages + 63) // 64, dtype=np.uint64)
        covered = 0
        with self._lock:
            for (a, n), bits in zip(self.ranges, self._bits, strict=True):
                lo, hi = max(iova, a), min(iova + length, a + n)
                if lo >= hi:
                    continue
                covered += hi - lo
                src = np.arange((lo - a) // ps, (hi - a) // ps, dtype=np.int64)
                dst = (src * ps + a - iova) // ps
                on = dst[bits_set(bits, src)].astype(np.uint64)
                np.bitwise_or.at(out, on >> np.uint64(6), np.uint64(1) << (on & np.uint64(63)))
                clear = src.astype(np.uint64)
                np.bitwise_and.at(
                    bits, clear >> np.uint64(6), ~(np.uint64(1) << (clear & np.uint64(63)))
                )
        if covered != length:
            raise DeviceError(f"DMA log report {iova:#x}+{length:#x} is outside the logged ranges")
        return out


__all__ = [
    "DeviceError",
    "DeviceIdentity",
    "DeviceModel",
    "FsmError",
    "MigCap",
    "MigState",
    "OutputGate",
]
