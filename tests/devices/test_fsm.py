"""The VFIO migration v2 state machine: every (from, to) pair of every capability set."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.devices import fsm
from vmferry.devices.fsm import FsmError, MigCap, MigState

ST = MigState.STOP
RU = MigState.RUNNING
SC = MigState.STOP_COPY
RE = MigState.RESUMING
RP = MigState.RUNNING_P2P
PC = MigState.PRE_COPY
PP = MigState.PRE_COPY_P2P
ER = MigState.ERROR

BASE = MigCap.STOP_COPY
P2P = MigCap.STOP_COPY | MigCap.P2P
PRE = MigCap.STOP_COPY | MigCap.PRE_COPY
ALL = MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY
CAP_SETS = [BASE, P2P, PRE, ALL]

SAVING = frozenset({PC, PP, SC})

# REFERENCE §1, transcribed independently of fsm.py: row = current, column = target.
REFERENCE_NEXT_HOP = """
     ST RU PC PP SC RE RP
ST   ST RP RP RP SC RE RP
RU   RP RU PC RP RP RP RP
PC   RU RU PC PP PP RU RU
PP   RP RP PC PP SC RP RP
SC   ST ST ER ER SC ST ST
RE   ST ST ST ST ST RE ST
RP   ST RU RU PP ST ST RP
"""
ABBREV = {"ST": ST, "RU": RU, "PC": PC, "PP": PP, "SC": SC, "RE": RE, "RP": RP, "ER": ER}

EXPECTED_STATES = {
    BASE: {ER, ST, RU, SC, RE},
    P2P: {ER, ST, RU, SC, RE, RP},
    PRE: {ER, ST, RU, SC, RE, PC},
    ALL: {ER, ST, RU, SC, RE, RP, PC, PP},
}

ALWAYS = {(RE, ST), (ST, RE), (ST, SC), (SC, ST)}
EXPECTED_ARCS = {
    BASE: ALWAYS | {(RU, ST), (ST, RU)},
    P2P: ALWAYS | {(RU, RP), (RP, RU), (RP, ST), (ST, RP)},
    PRE: ALWAYS | {(RU, ST), (ST, RU), (RU, PC), (PC, RU), (PC, SC)},
    ALL: ALWAYS
    | {(RU, RP), (RP, RU), (RP, ST), (ST, RP)}
    | {(RU, PC), (PC, RU), (PC, PP), (PP, PC), (PP, RP), (PP, SC), (RP, PP)},
}

PAIRS = [
    pytest.param(caps, a, b, id=f"{fsm.caps_name(caps)}-{a.name}-{b.name}")
    for caps in CAP_SETS
    for a, b in itertools.product(sorted(EXPECTED_STATES[caps]), repeat=2)
]


def shortest(caps: MigCap, cur: MigState, target: MigState) -> int | None:
    """Length of the shortest legal path, by BFS over the direct arcs; None if there is none.

    Interior states may not be RESUMING, nor in the saving group unless the path has been
    in the saving group since its start (the one stream is kept, never opened mid-way).
    """
    if cur == target:
        return 0
    if ER in (cur, target) or (cur, target) in {(SC, PC), (SC, PP)}:
        return None
    arcs = EXPECTED_ARCS[caps]
    start = (cur, cur in SAVING)
    dist = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        state, kept = node
        for a, b in sorted(arcs):
            if a != state:
                continue
            if b == target:
                return dist[node] + 1
            if b == RE or (b in SAVING and not kept):
                continue
            nxt = (b, kept and b in SAVING)
            if nxt not in dist:
                dist[nxt] = dist[node] + 1
                queue.append(nxt)
    return None


# ---- the data --------------------------------------------------------------------------


def test_kernel_numbers() -> None:
    assert [(s.name, int(s)) for s in MigState] == [
        ("ERROR", 0),
        ("STOP", 1),
        ("RUNNING", 2),
        ("STOP_COPY", 3),
        ("RESUMING", 4),
        ("RUNNING_P2P", 5),
        ("PRE_COPY", 6),
        ("PRE_COPY_P2P", 7),
    ]
    assert (int(MigCap.STOP_COPY), int(MigCap.P2P), int(MigCap.PRE_COPY)) == (1, 2, 4)


@pytest.mark.parametrize("caps", CAP_SETS, ids=fsm.caps_name)
def test_states_for(caps: MigCap) -> None:
    assert fsm.states_for(caps) == EXPECTED_STATES[caps]


@pytest.mark.parametrize("caps", CAP_SETS, ids=fsm.caps_name)
def test_direct_arcs(caps: MigCap) -> None:
    arcs = fsm.direct_arcs(caps)
    assert arcs == EXPECTED_ARCS[caps]
    states = fsm.states_for(caps)
    assert all(a in states and b in states and a != b for a, b in arcs)
    assert not any(ER in arc for arc in arcs)


@pytest.mark.parametrize("caps", CAP_SETS, ids=fsm.caps_name)
def test_forbidden_arcs(caps: MigCap) -> None:
    arcs = fsm.direct_arcs(caps)
    assert (SC, PC) not in arcs
    assert (SC, PP) not in arcs
    if MigCap.P2P in caps:
        assert (RU, ST) not in arcs and (ST, RU) not in arcs
        assert (PC, SC) not in arcs  # with P2P, PRE_COPY goes through PRE_COPY_P2P
    else:
        assert (RU, ST) in arcs and (ST, RU) in arcs
    for target in (PC, PP):
        if target in fsm.states_for(caps):
            with pytest.raises(FsmError, match=r"STOP_COPY.*PRE_COPY"):
                fsm.path(caps, SC, target)


def test_next_hop_table_is_the_reference() -> None:
    lines = REFERENCE_NEXT_HOP.split("\n")[1:-1]
    columns = [ABBREV[c] for c in lines[0].split()]
    for line in lines[1:]:
        cur, *hops = line.split()
        for target, hop in zip(columns, hops, strict=True):
            assert fsm.NEXT_HOP[ABBREV[cur]][target] == ABBREV[hop], (cur, target)
    for s in MigState:
        assert fsm.NEXT_HOP[s][ER] == ER
        assert fsm.NEXT_HOP[ER][s] == ER
    assert set(fsm.NEXT_HOP) == set(MigState)
    assert all(set(row) == set(MigState) for row in fsm.NEXT_HOP.values())


@pytest.mark.parametrize(
    ("caps", "cur", "target", "hops"),
    [
        # a missing hop is looked up again from that hop toward the same target
        (BASE, RU, ST, [ST]),
        (BASE, ST, RU, [RU]),
        (BASE, RU, SC, [ST, SC]),
        (BASE, SC, RU, [ST, RU]),
        (BASE, RU, RE, [ST, RE]),
        (PRE, PC, SC, [SC]),
        (PRE, PC, ST, [RU, ST]),
        (PRE, ST, PC, [RU, PC]),
        (PRE, RE, PC, [ST, RU, PC]),
        (P2P, RU, SC, [RP, ST, SC]),
        (P2P, RE, RU, [ST, RP, RU]),
        (ALL, PC, SC, [PP, SC]),
        (ALL, ST, PC, [RP, RU, PC]),
        (ALL, ST, PP, [RP, PP]),
        (ALL, RU, PP, [RP, PP]),
        (ALL, PP, RU, [RP, RU]),
        (ALL, PP, RE, [RP, ST, RE]),
        (ALL, PC, RP, [RU, RP]),
        (ALL, SC, RU, [ST, RP, RU]),
        (ALL, RU, SC, [RP, ST, SC]),
    ],
)
def test_specific_paths(
    caps: MigCap, cur: MigState, target: MigState, hops: list[MigState]
) -> None:
    assert fsm.path(caps, cur, target) == hops


# ---- every pair -----------------------------------------------------------------------


@pytest.mark.parametrize(("caps", "cur", "target"), PAIRS)
def test_every_pair(caps: MigCap, cur: MigState, target: MigState) -> None:
    best = shortest(caps, cur, target)
    if best is None:
        with pytest.raises(FsmError) as err:
            fsm.path(caps, cur, target)
        assert cur.name in str(err.value) and target.name in str(err.value)
        assert (err.value.cur, err.value.target, err.value.caps) == (cur, target, caps)
        return
    hops = fsm.path(caps, cur, target)
    assert len(hops) == best
    if cur == target:
        assert hops == []
        return
    assert hops[-1] == target
    arcs = fsm.direct_arcs(caps)
    seq = [cur, *hops]
    for i, arc in enumerate(itertools.pairwise(seq)):
        assert arc in arcs
        last = i == len(hops) - 1
        assert last or not fsm.opens_saving(arc)
        assert last or not fsm.opens_resuming(arc)
        assert i == 0 or not fsm.commits_resuming(arc)  # only when leaving RESUMING
    for i, s in enumerate(hops[:-1]):
        assert s != RE
        # a saving state mid-way only while the stream open since the start is kept
        assert s not in SAVING or all(x in SAVING for x in seq[: i + 2])
    assert hops[0] == fsm.next_hop(caps, cur, target)


@pytest.mark.parametrize("caps", CAP_SETS, ids=fsm.caps_name)
def test_error_leaves_only_by_reset(caps: MigCap) -> None:
    for target in fsm.states_for(caps) - {ER}:
        with pytest.raises(FsmError, match="reset"):
            fsm.path(caps, ER, target)
    assert fsm.path(caps, ER, ER) == []
    with pytest.raises(FsmError, match="ERROR"):
        fsm.path(caps, RU, ER)


def test_states_the_device_lacks() -> None:
    with pytest.raises(FsmError, match="RUNNING_P2P"):
        fsm.path(BASE, RU, RP)
    with pytest.raises(FsmError, match="PRE_COPY_P2P"):
        fsm.path(PRE, PP, RU)
    with pytest.raises(FsmError, match="PRE_COPY"):
        fsm.path(P2P, RU, PC)


@pytest.mark.parametrize("caps", [MigCap(0), MigCap.P2P, MigCap.PRE_COPY, MigCap(6)])
def test_stop_copy_is_mandatory(caps: MigCap) -> None:
    with pytest.raises(FsmError, match="mandatory"):
        fsm.states_for(caps)
    with pytest.raises(FsmError, match="mandatory"):
        fsm.direct_arcs(caps)
    with pytest.raises(FsmError, match="mandatory"):
        fsm.path(caps, RU, ST)


def test_caps_name() -> None:
    assert fsm.caps_name(ALL) == "STOP_COPY|P2P|PRE_COPY"
    assert fsm.caps_name(BASE) == "STOP_COPY"
    assert fsm.caps_name(MigCap(0)) == "0"


# ---- sessions and state properties -------------------------------------------------------


@pytest.mark.parametrize("caps", CAP_SETS, ids=fsm.caps_name)
def test_sessions_on_every_arc(caps: MigCap) -> None:
    opens = {(RU, PC), (RP, PP), (ST, SC)}
    for arc in fsm.direct_arcs(caps):
        src, dst = arc
        assert fsm.opens_saving(arc) == (arc in opens)
        assert fsm.keeps_saving(arc) == (src in SAVING and dst in SAVING)
        assert fsm.closes_saving(arc) == (src in SAVING and dst not in SAVING)
        assert fsm.opens_resuming(arc) == (arc == (ST, RE))
        assert fsm.commits_resuming(arc) == (arc == (RE, ST))
        assert fsm.opens_stream(arc) == (arc in opens or arc == (ST, RE))
        effects = [
            fsm.opens_saving(arc),
            fsm.keeps_saving(arc),
            fsm.closes_saving(arc),
            fsm.opens_resuming(arc),
            fsm.commits_resuming(arc),
        ]
        assert sum(effects) <= 1, arc
        # every arc into the saving group from outside it opens the stream
        if dst in SAVING and src not in SAVING:
            assert fsm.opens_saving(arc)


def test_sessions_closing_arcs() -> None:
    closing = {arc for arc in fsm.direct_arcs(ALL) if fsm.closes_saving(arc)}
    assert closing == {(PC, RU), (PP, RP), (SC, ST)}
    keeping = {arc for arc in fsm.direct_arcs(ALL) if fsm.keeps_saving(arc)}
    assert keeping == {(PC, PP), (PP, PC), (PP, SC)}
    assert {arc for arc in fsm.direct_arcs(PRE) if fsm.keeps_saving(arc)} == {(PC, SC)}


def test_state_properties() -> None:
    assert {s for s in MigState if fsm.is_saving(s)} == {PC, PP, SC}
    assert {s for s in MigState if fsm.is_running(s)} == {RU, RP, PC, PP}
    assert {s for s in MigState if fsm.is_p2p_quiesced(s)} == {RP, PP}
    assert {s for s in MigState if not fsm.dma_allowed(s)} == {ST, SC, RE, ER}
    assert fsm.SAVING_GROUP == SAVING


# ---- properties ----------------------------------------------------------------------------


@st.composite
def walks(draw: st.DrawFn) -> tuple[MigCap, list[MigState]]:
    caps = draw(st.sampled_from(CAP_SETS))
    states = sorted(fsm.states_for(caps) - {ER})
    return caps, draw(st.lists(st.sampled_from(states), max_size=30))


@given(walks())
def test_walks_keep_streams_consistent(walk: tuple[MigCap, list[MigState]]) -> None:
    """A device driven through any request sequence: streams open exactly in their states."""
    caps, targets = walk
    state = RU
    saving = resuming = False
    for target in targets:
        try:
            hops = fsm.path(caps, state, target)
        except FsmError:
            assert state == SC and target in (PC, PP)
            continue
        assert len(hops) <= 4  # RESUMING → PRE_COPY with P2P is the longest
        for i, nxt in enumerate(hops):
            arc = (state, nxt)
            assert arc in fsm.direct_arcs(caps)
            if fsm.opens_saving(arc):
                assert not saving and i == len(hops) - 1
                saving = True
            elif fsm.closes_saving(arc):
                assert saving
                saving = False
            elif fsm.keeps_saving(arc):
                assert saving
            if fsm.opens_resuming(arc):
                assert not resuming and i == len(hops) - 1
                resuming = True
            elif fsm.commits_resuming(arc):
                assert resuming
                resuming = False
            state = nxt
            assert saving == fsm.is_saving(state)
            assert resuming == (state == RE)
            assert fsm.dma_allowed(state) == fsm.is_running(state)
        assert state == target


@given(
    st.sampled_from(CAP_SETS).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.sampled_from(sorted(fsm.states_for(c) - {ER})),
            st.sampled_from(sorted(fsm.states_for(c) - {ER})),
        )
    )
)
def test_walk_is_memoryless(req: tuple[MigCap, MigState, MigState]) -> None:
    """After the first hop, the rest of the path is the path from that hop."""
    caps, cur, target = req
    if (cur, target) in fsm.FORBIDDEN:
        return
    hops = fsm.path(caps, cur, target)
    if hops:
        assert fsm.path(caps, hops[0], target) == hops[1:]
