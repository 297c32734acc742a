"""The background push after the switch keeps max-bandwidth: it paces itself so that what
went out since the switch, answers to requests included, fits the cap, while answers
never wait for it; the cap is read again as it goes (released, the push runs free); and
the source hands its max-bandwidth to the page server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

from tests.migration.postcopy.harness import MiB, Pair, connect, make_pair, uffd_unavailable
from vmferry.machine.machine import Machine
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration.codec import ROLE_BACKGROUND, ROLE_URGENT
from vmferry.migration.figures import LiveFigures
from vmferry.migration.link import DestinationLink
from vmferry.migration.postcopy.pages import SentPages
from vmferry.migration.postcopy.source_side import PostcopySource

SIZE = 8 * MiB
RUN = 16  # pages in one push run
needs_uffd = pytest.mark.skipif(
    (why := uffd_unavailable()) is not None, reason=f"no userfaultfd here: {why}"
)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = make_pair(SIZE)
    yield p
    p.close()


@needs_uffd
def test_the_push_makes_room_for_the_answers_within_the_cap(pair: Pair) -> None:
    rate = 2e6
    ps, fs, _ = connect(pair, channels=2, max_bandwidth=rate)
    fs.start()
    t0 = time.monotonic()
    ps.start()
    fs.request(0, 2 * MiB)  # answered at once, whatever the cap: 2 MiB, a second's worth
    assert fs.wait_present(0, 2 * MiB, 5), "the answers waited for the cap"
    time.sleep(0.5)
    elapsed = time.monotonic() - t0
    s = ps.served
    room = max(0.0, rate * elapsed - s.urgent_pages * PAGE_SIZE) / PAGE_SIZE
    assert s.urgent_pages >= 2 * MiB // PAGE_SIZE - 2 * RUN
    assert s.background_pages <= room + 2 * RUN, (s, elapsed)


@needs_uffd
def test_a_cap_taken_off_lets_the_push_run_free(pair: Pair) -> None:
    ps, fs, _ = connect(pair, channels=2, max_bandwidth=1e3)  # a run a minute
    fs.start()
    ps.start()
    time.sleep(0.2)
    assert ps.served.background_pages <= 2 * RUN
    ps.max_bandwidth = None
    assert fs.wait_complete(5), "the push kept the cap it was started with"


def test_the_source_gives_its_max_bandwidth_to_the_page_server() -> None:
    memory = SimpleNamespace(bytes=np.zeros(SIZE, dtype=np.uint8))
    machine = cast(Machine, SimpleNamespace(memory=memory))
    link = cast(DestinationLink, SimpleNamespace())
    pc = PostcopySource(machine, LiveFigures(SIZE), link, None, max_bandwidth=150_000_000)
    urgent, background = socket.socketpair(), socket.socketpair()
    pc._socks = {ROLE_URGENT: urgent[0], ROLE_BACKGROUND: background[0]}
    sent = SentPages(SIZE // PAGE_SIZE)
    sent.bitmap.set_all()  # nothing to push: the server only starts
    try:
        pc._start_server(sent)
        assert pc.server is not None and pc.server.max_bandwidth == 150_000_000
    finally:
        for s in (*urgent, *background):
            s.shutdown(socket.SHUT_RDWR)
        pc.close()
        for s in (*urgent, *background):
            s.close()
