"""The VFIO migration v2 device state machine, as data.

States carry the kernel's numbers; the arcs a device must support depend on its
capability flags; a request for a far state is walked hop by hop with the kernel's
next-hop table. Every device model and the migration engine use this module, and
nothing else decides what a transition means.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeAlias

from vmferry.errors import VmferryError


class MigState(enum.IntEnum):
    """A device's migration state (``enum vfio_device_mig_state``)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigCap(enum.IntFlag):
    """Migration capability flags (``VFIO_MIGRATION_*``); STOP_COPY is mandatory."""

    STOP_COPY = 1
    P2P = 2
    PRE_COPY = 4


Arc: TypeAlias = tuple[MigState, MigState]

_ST = MigState.STOP
_RU = MigState.RUNNING
_SC = MigState.STOP_COPY
_RE = MigState.RESUMING
_RP = MigState.RUNNING_P2P
_PC = MigState.PRE_COPY
_PP = MigState.PRE_COPY_P2P
_ER = MigState.ERROR

#: The states that share one saving stream.
SAVING_GROUP: frozenset[MigState] = frozenset({_PC, _PP, _SC})
_RUNNING_STATES = frozenset({_RU, _RP, _PC, _PP})
_P2P_QUIESCED = frozenset({_RP, _PP})
_NO_DMA = frozenset({_ST, _SC, _RE, _ER})
_OPENS_SAVING: frozenset[Arc] = frozenset({(_RU, _PC), (_RP, _PP), (_ST, _SC)})

#: Requests refused outright, not only as direct arcs: pre-copy cannot follow stop-copy.
FORBIDDEN: frozenset[Arc] = frozenset({(_SC, _PC), (_SC, _PP)})

_ALWAYS_ARCS = frozenset({(_RE, _ST), (_ST, _RE), (_ST, _SC), (_SC, _ST)})
_NO_P2P_ARCS = frozenset({(_RU, _ST), (_ST, _RU)})
_P2P_ARCS = frozenset({(_RU, _RP), (_RP, _RU), (_RP, _ST), (_ST, _RP)})
_PRE_COPY_ARCS = frozenset({(_RU, _PC), (_PC, _RU), (_PC, _SC)})
_PRE_COPY_P2P_ARCS = frozenset(
    {(_RU, _PC), (_PC, _RU), (_PC, _PP), (_PP, _PC), (_PP, _RP), (_PP, _SC), (_RP, _PP)}
)

# Next hop toward a target: row = current state, column = target, in this column order.
_COLUMNS = (_ST, _RU, _PC, _PP, _SC, _RE, _RP, _ER)
_ROWS: dict[MigState, tuple[MigState, ...]] = {
    _ST: (_ST, _RP, _RP, _RP, _SC, _RE, _RP, _ER),
    _RU: (_RP, _RU, _PC, _RP, _RP, _RP, _RP, _ER),
    _PC: (_RU, _RU, _PC, _PP, _PP, _RU, _RU, _ER),
    _PP: (_RP, _RP, _PC, _PP, _SC, _RP, _RP, _ER),
    _SC: (_ST, _ST, _ER, _ER, _SC, _ST, _ST, _ER),
    _RE: (_ST, _ST, _ST, _ST, _ST, _RE, _ST, _ER),
    _RP: (_ST, _RU, _RU, _PP, _ST, _ST, _RP, _ER),
    _ER: (_ER, _ER, _ER, _ER, _ER, _ER, _ER, _ER),
}

#: ``NEXT_HOP[cur][target]``: the kernel's first step from ``cur`` toward ``target``
#: for a device with every capability (ERROR: no way there).
NEXT_HOP: Mapping[MigState, Mapping[MigState, MigState]] = MappingProxyType(
    {cur: MappingProxyType(dict(zip(_COLUMNS, row, strict=True))) for cur, row in _ROWS.items()}
)


class FsmError(VmferryError):
    """A migration state request that this device cannot carry out."""

    def __init__(
        self,
        why: str,
        caps: MigCap,
        cur: MigState | None = None,
        target: MigState | None = None,
    ) -> None:
        self.cur = cur
        self.target = target
        self.caps = caps
        where = f"{cur.name} → {target.name} " if cur is not None and target is not None else ""
        super().__init__(f"{where}(caps {caps_name(caps)}): {why}")


def caps_name(caps: MigCap) -> str:
    """``STOP_COPY|P2P|PRE_COPY`` style name of a capability set."""
    names = [m.name or str(int(m)) for m in MigCap if m in caps]
    rest = int(caps) & ~int(MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def _check_caps(caps: MigCap) -> MigCap:
    caps = MigCap(caps)
    if MigCap.STOP_COPY not in caps:
        raise FsmError("STOP_COPY is a mandatory capability", caps)
    return caps


@functools.cache
def states_for(caps: MigCap) -> frozenset[MigState]:
    """The states a device with these capabilities has."""
    caps = _check_caps(caps)
    states = {_ST, _RU, _SC, _RE, _ER}
    if MigCap.P2P in caps:
        states.add(_RP)
    if MigCap.PRE_COPY in caps:
        states.add(_PC)
        if MigCap.P2P in caps:
            states.add(_PP)
    return frozenset(states)


@functools.cache
def direct_arcs(caps: MigCap) -> frozenset[Arc]:
    """The single-step transitions a device with these capabilities must implement."""
    caps = _check_caps(caps)
    p2p = MigCap.P2P in caps
    arcs = set(_ALWAYS_ARCS)
    arcs |= _P2P_ARCS if p2p else _NO_P2P_ARCS
    if MigCap.PRE_COPY in caps:
        arcs |= _PRE_COPY_P2P_ARCS if p2p else _PRE_COPY_ARCS
    return frozenset(arcs)


def next_hop(caps: MigCap, cur: MigState, target: MigState) -> MigState:
    """The kernel's next step from ``cur`` toward ``target``; ERROR when there is none.

    A hop the device lacks is looked up again from that hop toward the same target.
    """
    have = states_for(caps)
    nxt = NEXT_HOP[cur][target]
    seen = {nxt}
    while nxt not in have:
        nxt = NEXT_HOP[nxt][target]
        if nxt in seen:  # a cycle of missing states: the kernel once looped forever here
            return _ER
        seen.add(nxt)
    return nxt


def path(caps: MigCap, cur: MigState, target: MigState) -> list[MigState]:
    """The hops from ``cur`` to ``target`` (excluding ``cur``, ending at ``target``).

    Raises :class:`FsmError` when the device cannot get there.
    """
    caps = _check_caps(caps)
    cur, target = MigState(cur), MigState(target)
    have = states_for(caps)
    if cur not in have:
        raise FsmError(f"the device has no state {cur.name}", caps, cur, target)
    if target not in have:
        raise FsmError(f"the device has no state {target.name}", caps, cur, target)
    if cur == target:
        return []
    if cur is _ER:
        why = "reset required: a device leaves ERROR only by reset (to RUNNING), not by an arc"
        raise FsmError(why, caps, cur, target)
    if target is _ER:
        raise FsmError("ERROR is entered by failing, not by request", caps, cur, target)
    if (cur, target) in FORBIDDEN:
        raise FsmError("pre-copy cannot follow stop-copy", caps, cur, target)
    hops: list[MigState] = []
    at = cur
    while at != target:
        nxt = next_hop(caps, at, target)
        if nxt is _ER or len(hops) >= len(MigState):
            raise FsmError(f"no path (stuck at {at.name})", caps, cur, target)
        hops.append(nxt)
        at = nxt
    _check_path(caps, cur, hops)
    return hops


def _check_path(caps: MigCap, cur: MigState, hops: list[MigState]) -> None:
    # The table is data: check what the walk produced rather than trust it.
    arcs = direct_arcs(caps)
    prev = cur
    for i, nxt in enumerate(hops):
        arc = (prev, nxt)
        if arc not in arcs:
            raise AssertionError(f"path {cur.name}→{hops[-1].name} uses non-arc {arc}")
        if i < len(hops) - 1 and opens_stream(arc):
            raise AssertionError(f"path {cur.name}→{hops[-1].name} opens a stream mid-way")
        prev = nxt


# ---- states --------------------------------------------------------------------------


def is_saving(state: MigState) -> bool:
    """The state belongs to the saving group (a saving stream is open)."""
    return state in SAVING_GROUP


def is_running(state: MigState) -> bool:
    """The device may run (execute work) in this state."""
    return state in _RUNNING_STATES


def is_p2p_quiesced(state: MigState) -> bool:
    """The device runs but starts no new peer-to-peer DMA."""
    return state in _P2P_QUIESCED


def dma_allowed(state: MigState) -> bool:
    """The device may DMA in this state (never in STOP, STOP_COPY, RESUMING, ERROR)."""
    return state not in _NO_DMA


# ---- stream sessions, per arc ----------------------------------------------------------


def opens_saving(arc: Arc) -> bool:
    """The arc opens the saving stream."""
    return arc in _OPENS_SAVING


def keeps_saving(arc: Arc) -> bool:
    """The arc moves within the saving group; the open stream carries on."""
    src, dst = arc
    return src != dst and src in SAVING_GROUP and dst in SAVING_GROUP


def closes_saving(arc: Arc) -> bool:
    """The arc leaves the saving group, closing its stream."""
    src, dst = arc
    return src in SAVING_GROUP and dst not in SAVING_GROUP


def opens_resuming(arc: Arc) -> bool:
    """The arc opens the (write-only) resuming stream."""
    return arc == (_ST, _RE)


def commits_resuming(arc: Arc) -> bool:
    """The arc loads the written resuming stream; it fails if that was incomplete."""
    return arc == (_RE, _ST)


def opens_stream(arc: Arc) -> bool:
    """The arc opens a saving or a resuming stream."""
    return opens_saving(arc) or opens_resuming(arc)


__all__ = [
    "FORBIDDEN",
    "NEXT_HOP",
    "SAVING_GROUP",
    "Arc",
    "FsmError",
    "MigCap",
    "MigState",
    "caps_name",
    "closes_saving",
    "commits_resuming",
    "direct_arcs",
    "dma_allowed",
    "is_p2p_quiesced",
    "is_running",
    "is_saving",
    "keeps_saving",
    "next_hop",
    "opens_resuming",
    "opens_saving",
    "opens_stream",
    "path",
    "states_for",
]
