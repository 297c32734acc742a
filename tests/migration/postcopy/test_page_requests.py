"""Post-copy's wire records: every valid record round-trips; a request outside guest RAM
or misaligned, and a malformed page run, are each one clear error."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.postcopy import page_requests as pr
from vmferry.migration.postcopy.page_requests import (
    PageReplyError,
    PageRequest,
    PageRequestError,
    PageRun,
    RunKind,
)

RAM = 64 << 20
RAM_PAGES = RAM // PAGE_SIZE


@st.composite
def requests(draw: st.DrawFn) -> PageRequest:
    n = draw(st.integers(1, pr.MAX_REQUEST_PAGES))
    first = draw(st.integers(0, RAM_PAGES - n))
    return PageRequest(first * PAGE_SIZE, n)


@st.composite
def runs(draw: st.DrawFn) -> PageRun:
    kind = draw(st.sampled_from([RunKind.URGENT, RunKind.BACKGROUND]))
    n = draw(st.integers(1, pr.MAX_RUN_PAGES))
    return PageRun(draw(st.integers(0, RAM_PAGES - n)) * PAGE_SIZE, n, kind)


@settings(max_examples=200)
@given(requests())
def test_a_request_round_trips(req: PageRequest) -> None:
    raw = pr.encode_request(req)
    assert len(raw) == pr.REQUEST.size and pr.decode_request(raw, RAM) == req


@settings(max_examples=200)
@given(st.one_of(runs(), st.integers(0, RAM_PAGES).map(lambda n: PageRun(0, n, RunKind.END))))
def test_a_run_header_round_trips(run: PageRun) -> None:
    assert pr.decode_run(pr.encode_run(run), RAM) == run


@settings(max_examples=200)
@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1))
def test_a_request_is_served_only_if_it_is_whole_pages_inside_ram(off: int, n: int) -> None:
    raw = pr.REQUEST.pack(pr.REQUEST_MAGIC, off, n)
    ok = off % PAGE_SIZE == 0 and 1 <= n <= pr.MAX_REQUEST_PAGES and off + n * PAGE_SIZE <= RAM
    if ok:
        assert pr.decode_request(raw, RAM) == PageRequest(off, n)
    else:
        with pytest.raises(PageRequestError, match=r"^page request refused: "):
            pr.decode_request(raw, RAM)


def test_refusals_name_what_is_wrong() -> None:
    def refuse(off: int, n: int) -> str:
        with pytest.raises(PageRequestError) as e:
            pr.decode_request(pr.REQUEST.pack(pr.REQUEST_MAGIC, off, n), RAM)
        return str(e.value)

    assert refuse(RAM, 1) == (
        "page request refused: RAM 0x4000000+0x1000 is outside guest RAM (0x0-0x4000000)"
    )
    assert refuse(RAM - PAGE_SIZE, 2).endswith("is outside guest RAM (0x0-0x4000000)")
    assert refuse(0x1001, 1) == "page request refused: RAM offset 0x1001 is not page aligned"
    assert refuse(0, 0) == "page request refused: 0 pages at 0x0: want 1..512"
    with pytest.raises(PageRequestError, match="magic b'XXXX'"):
        pr.decode_request(struct.pack("<4sQI", b"XXXX", 0, 1), RAM)
    with pytest.raises(PageRequestError, match="is 5 bytes, want 16"):
        pr.decode_request(b"PgRq\0", RAM)


@settings(max_examples=200)
@given(
    st.binary(min_size=4, max_size=4),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 32) - 1),
    st.integers(0, (1 << 32) - 1),
)
def test_a_malformed_run_header_is_one_clear_error(
    magic: bytes, off: int, n: int, kind: int
) -> None:
    raw = pr.RUN.pack(magic, off, n, kind)
    data = kind in (1, 2) and off % PAGE_SIZE == 0 and 1 <= n <= pr.MAX_RUN_PAGES
    good = magic == pr.RUN_MAGIC and (
        (data and off + n * PAGE_SIZE <= RAM) or (kind == 3 and off == 0 and n <= RAM_PAGES)
    )
    if good:
        assert pr.decode_run(raw, RAM).npages == n
    else:
        with pytest.raises(PageReplyError, match=r"^(page run|end of pages)"):
            pr.decode_run(raw, RAM)


def test_run_refusals_name_the_field() -> None:
    def refuse(off: int, n: int, kind: int, magic: bytes = pr.RUN_MAGIC) -> str:
        with pytest.raises(PageReplyError) as e:
            pr.decode_run(pr.RUN.pack(magic, off, n, kind), RAM)
        return str(e.value)

    assert refuse(0, 17, 2) == "page run refused: 17 pages at 0x0: want 1..16"
    assert refuse(0, 1, 9) == "page run at 0x0 has kind 9, want 1, 2 or 3"
    assert "outside guest RAM" in refuse(RAM - PAGE_SIZE, 2, 1)
    assert "magic b'PgRq'" in refuse(0, 1, 1, pr.REQUEST_MAGIC)
    assert refuse(0, RAM_PAGES + 1, 3).startswith("end of pages: offset 0x0 and 16385 pages")
