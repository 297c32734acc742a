"""A page run whose COPY finds pages already there: the source sends each page once, and
only pages the fault server neither holds nor fills itself, so something else filled
them (here: a zero-fill behind the server's back, as a read(2) or populate of registered
RAM would). Post-copy fails in one line naming the pages, instead of digesting the
staging copy for data the guest does not see (the audit would then pass)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.migration.postcopy.harness import MiB, Pair, connect, make_pair, uffd_unavailable
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.postcopy.fault_server import FaultServerError

pytestmark = pytest.mark.skipif(
    (why := uffd_unavailable()) is not None, reason=f"no userfaultfd here: {why}"
)
SIZE = 2 * MiB
BEHIND = 100  # the page filled behind the server's back


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = make_pair(SIZE)
    yield p
    p.close()


def test_a_page_filled_behind_the_servers_back_fails_postcopy_naming_it(pair: Pair) -> None:
    ps, fs, _ = connect(pair, channels=2)
    pair.uf.zeropage(pair.dest.host_addr + BEHIND * PAGE_SIZE, PAGE_SIZE)
    landed: list[int] = []
    fs.on_landed = lambda first, data: landed.append(first)
    fs.start()
    ps.start()
    with pytest.raises(FaultServerError) as got:
        fs.wait_complete(10)
    msg = str(got.value)
    assert "\n" not in msg and "filled behind the fault server's back" in msg, msg
    run = next(int(w.split("+")[0]) for w in msg.split() if "+" in w)
    assert run <= BEHIND < run + 16, msg  # the run that held it (16 pages at most)
    assert "1 of them" in msg and "none by its own fills" in msg, msg
    assert run not in landed, "the run was digested as landed"
    assert not fs.present.holds(run, 1)
