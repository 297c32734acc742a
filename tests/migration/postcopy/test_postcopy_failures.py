"""Post-copy's failures after the switch, when the VM's state is split (it runs at the
destination, its owed pages are still at the source): a destination killed loses the
VM — the source says so in one line, keeps the VM paused with its memory, and neither
side hangs; a link cut leaves each side with one clear error within x-peer-timeout, the
destination's guest stopped (it cannot run on without its pages)."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.migration import live
from tests.migration.live import (
    Destination,
    Events,
    Guest,
    Proxy,
    Workload,
    assert_source_intact,
    reference_result,
    wait_until,
)
from tests.migration.postcopy.harness import uffd_unavailable
from vmferry.errors import MigrationError
from vmferry.machine.machine import Machine
from vmferry.migration import reception
from vmferry.migration.codec import POSTCOPY_HELLO
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.postcopy import fault_server, page_requests, page_server, source_side
from vmferry.migration.postcopy.source_side import POSTCOPY_LOST
from vmferry.migration.source import MigrationSource
from vmferry.migration.status import MigrationStatus

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(150),  # each test's own waits are bounded well within it
    pytest.mark.skipif((why := uffd_unavailable()) is not None, reason=f"no uffd: {why}"),
]
PEER_TIMEOUT_MS = 2000
PARAMS = MigrationParameters(verify="on", peer_timeout_ms=PEER_TIMEOUT_MS)
# A guest that outlasts any migration (about 30 min): where the test strikes (a kill, a
# SIGSTOP) the guest must still be running, and its RESULT is never needed.
ENDLESS = Workload(wss="32M", seed=11, rounds=400, rate=8, memory=256 << 20)
# As long, but it rewrites its working set every 0.5 s: it asks for many owed pages
# (the bad-input tests corrupt the 20th request or run).
BUSY = Workload(wss="32M", seed=11, rounds=3600, rate=64, memory=256 << 20)
# About 16 s, slow enough (2 s per pass over its working set) that its requests do not
# fetch every owed page before the cut; it ends at the destination with its RESULT.
WORKLOAD = Workload(wss="32M", seed=11, rounds=8, rate=16, memory=256 << 20)
# The background push is held (one run, then a pace no run meets) until the test lets
# it go: pages stay owed when the test strikes, however few were owed at the switch and
# however fast the host (requests are still answered: the guest's pace bounds them).
HELD = 1e-3  # bytes/s


class PushHold:
    """Every page server's push held at ``HELD`` until ``release`` (then at the source's
    own cap): servers made after it (a resumed link's) are not held."""

    def __init__(self) -> None:
        self.held = True
        self.servers: list[page_server.PageServer] = []

    def release(self) -> None:
        self.held = False
        for server in self.servers:
            server.max_bandwidth = None  # its pace looks again within 50 ms


@pytest.fixture(autouse=True)
def push(monkeypatch: pytest.MonkeyPatch) -> PushHold:
    hold = PushHold()
    real = page_server.PageServer.__init__

    def init(server: page_server.PageServer, *args: Any, **kw: Any) -> None:
        if hold.held:
            kw["max_bandwidth"] = HELD
        real(server, *args, **kw)
        hold.servers.append(server)

    monkeypatch.setattr(page_server.PageServer, "__init__", init)
    return hold


def _start(guest: Guest, uri: str, events: Events) -> MigrationSource:
    """Post-copy asked for before round 0 ends: the switch ends round 0, whatever the
    policy says of it (no race with a round that converged, nor with the guest's end)."""
    src = MigrationSource(
        guest.machine, uri, PARAMS, MigrationCapabilities(postcopy_ram=True), on_event=events
    )
    src.start()
    src.request_postcopy()
    return src


def _await_postcopy_owing(src: MigrationSource) -> None:
    """Until the guest runs at the destination with pages still owed (then the test
    strikes): postcopy-active shows from the switch on, the pages' figures move only
    once the destination resumed."""

    def moving() -> bool:
        st = src.stats
        pc = st.postcopy
        sent = pc.urgent_pages + pc.pushed_pages
        return st.status == MigrationStatus.POSTCOPY_ACTIVE and sent > 0 and st.remaining > 0

    wait_until(lambda: src.done.is_set() or moving(), 60, "post-copy with pages owed")
    st = src.stats
    assert st.status == MigrationStatus.POSTCOPY_ACTIVE and st.postcopy.active, st.error
    assert st.remaining > 0, "every page had landed before the test could strike"


def test_a_destination_killed_during_postcopy_loses_the_vm_the_source_says_so() -> None:
    proc, port = live.start_destination_process()  # before the guest: its run is not spent
    guest = Guest(ENDLESS)
    events = Events()
    try:
        src = _start(guest, f"tcp:127.0.0.1:{port}", events)
        _await_postcopy_owing(src)
        t_kill = time.monotonic()
        proc.kill()
        assert src.wait(PEER_TIMEOUT_MS / 1e3 + 5), "the source hung after the kill"
        took = time.monotonic() - t_kill
        st = src.stats
        assert st.status == MigrationStatus.FAILED
        assert st.error.startswith(POSTCOPY_LOST), st.error
        assert "\n" not in st.error
        assert "postcopy-active" in events.statuses() and events.statuses()[-1] == "failed"
        # Its memory is kept, the VM paused: it must not run here on its own.
        m = guest.machine
        assert m.paused and m.exit is None and src.released
        print(f"\nkilled in post-copy: the source failed {took:.2f} s later: {st.error}")
    finally:
        proc.kill()
        assert proc.finish(10).returncode == -9
        guest.close()


def _not_ended(src: MigrationSource, dest: Destination) -> str:
    """Why a resumed migration did not end, as each side last said it."""
    st, there = src.stats, dest.incoming.status
    return f"the resumed migration did not end: source {st.status} {st.error!r}, dest {there}"


def test_a_link_cut_during_postcopy_pauses_both_and_recovery_gives_the_reference_result(
    push: PushHold,
) -> None:
    dest = Destination()
    proxy = Proxy(dest.port)
    guest = Guest(WORKLOAD)
    events = Events()
    try:
        src = _start(guest, proxy.uri, events)
        _await_postcopy_owing(src)
        proxy.cut()
        push.release()  # the resumed link's push goes at full speed
        paused = MigrationStatus.POSTCOPY_PAUSED
        wait_until(
            lambda: src.stats.status == paused and dest.incoming.status == paused,
            PEER_TIMEOUT_MS / 1e3 + 5,
            "both sides to pause",
        )
        assert not src.done.is_set() and dest.waiting()
        dest.incoming.recover("tcp:127.0.0.1:0")  # migrate-recover on the destination
        src.resume_postcopy(f"tcp:127.0.0.1:{dest.incoming.recover_port}")
        assert src.wait(60), _not_ended(src, dest)
        st = src.stats
        assert st.status == MigrationStatus.COMPLETED, st.error
        assert st.postcopy.recoveries == 1 and st.verify.status == "passed"
        assert st.verify.phases["audit"]["pages"] == guest.machine.memory.npages
        statuses = events.statuses()
        assert statuses[-3:] == ["postcopy-paused", "postcopy-active", "completed"], statuses
        result, out = dest.finish()
        assert out == reference_result(WORKLOAD)
        assert result.postcopy["landed_pages"] >= st.postcopy.owed_pages
        print(f"\ncut and recovered: {st.postcopy}")
    finally:
        dest.close()
        guest.close()


def test_a_second_cut_during_the_recovery_stays_paused_and_the_next_recovery_completes(
    push: PushHold,
) -> None:
    dest = Destination()
    proxy = Proxy(dest.port)
    guest = Guest(WORKLOAD)
    paused = MigrationStatus.POSTCOPY_PAUSED
    bound = PEER_TIMEOUT_MS / 1e3 + 5
    try:
        src = _start(guest, proxy.uri, Events())
        _await_postcopy_owing(src)
        proxy.cut()
        push.release()  # the resumed link's push goes at full speed
        wait_until(
            lambda: src.stats.status == paused and dest.incoming.status == paused,
            bound,
            "both sides to pause",
        )
        # The recovery's own link is cut right after the source's first hello.
        dest.incoming.recover("tcp:127.0.0.1:0")
        second = Proxy(dest.incoming.recover_port, conn=0, after=POSTCOPY_HELLO.size)
        src.resume_postcopy(second.uri)
        wait_until(lambda: src.stats.error.startswith("migrate resume"), bound, "it to fail")
        wait_until(
            lambda: src.stats.status == paused and dest.incoming.status == paused,
            bound,
            "both sides to stay paused",
        )
        assert second.was_cut.is_set() and not src.done.is_set() and dest.waiting()
        dest.incoming.recover("tcp:127.0.0.1:0")
        src.resume_postcopy(f"tcp:127.0.0.1:{dest.incoming.recover_port}")
        assert src.wait(60), _not_ended(src, dest)
        st = src.stats
        assert st.status == MigrationStatus.COMPLETED, st.error
        assert st.postcopy.recoveries == 1 and st.verify.status == "passed"
        _, out = dest.finish()
        assert out == reference_result(WORKLOAD)
    finally:
        dest.close()
        guest.close()


def _corrupt_once(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, bad: Any) -> None:
    """``module.name`` (an encoder) returns ``bad(record)`` for its 20th record."""
    real = getattr(module, name)
    calls = [0]

    def encode(record: Any) -> bytes:
        calls[0] += 1
        return bytes(bad(record)) if calls[0] == 20 else bytes(real(record))

    monkeypatch.setattr(module, name, encode)


def _bad_input(dest: Destination, guest: Guest) -> tuple[MigrationSource, BaseException]:
    try:
        src = _start(guest, dest.uri, Events())
        assert src.wait(30), "the source hung on bad input"
        assert dest.wait(30), "the destination hung on bad input"
        return src, dest.failure()
    finally:
        dest.close()


def test_a_page_request_outside_guest_ram_stops_postcopy_with_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outside = BUSY.memory
    _corrupt_once(
        monkeypatch,
        fault_server,
        "encode_request",
        lambda r: page_requests.encode_request(page_requests.PageRequest(outside, r.npages)),
    )
    dest = Destination()
    guest = Guest(BUSY)
    try:
        src, dest_err = _bad_input(dest, guest)
        st = src.stats
        assert st.status == MigrationStatus.FAILED
        assert st.error.startswith("post-copy stopped (page request refused: RAM "), st.error
        assert "is outside guest RAM" in st.error and "\n" not in st.error
        assert "before the last page landed" in str(dest_err)
        assert guest.machine.paused
    finally:
        guest.close()


def test_a_malformed_page_run_stops_postcopy_with_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _corrupt_once(
        monkeypatch,
        page_server,
        "encode_run",
        lambda r: b"XXXX" + page_requests.encode_run(r)[4:],
    )
    dest = Destination()
    guest = Guest(BUSY)
    try:
        src, dest_err = _bad_input(dest, guest)
        assert "page run has magic b'XXXX'" in str(dest_err), dest_err
        assert "\n" not in str(dest_err)
        st = src.stats
        assert st.status == MigrationStatus.FAILED
        assert st.error.startswith("the destination stopped post-copy ("), st.error
        assert "page run has magic" in st.error
    finally:
        guest.close()


def test_a_destination_that_stops_answering_during_postcopy_is_given_up_within_the_bound() -> None:
    proc, port = live.start_destination_process()
    guest = Guest(ENDLESS)
    try:
        src = _start(guest, f"tcp:127.0.0.1:{port}", Events())
        _await_postcopy_owing(src)
        t0 = time.monotonic()
        proc.p.send_signal(signal.SIGSTOP)
        # Silent, not gone: a link that may come back (QEMU's postcopy-paused).
        wait_until(
            lambda: src.stats.status == MigrationStatus.POSTCOPY_PAUSED,
            PEER_TIMEOUT_MS / 1e3 + 5,
            "the source to pause",
        )
        took = time.monotonic() - t0
        assert took >= PEER_TIMEOUT_MS / 1e3 * 0.5, "gave up before the bound"
        assert guest.machine.paused and guest.machine.exit is None
        src.cancel()  # nothing resumes it here: it ends, the VM lost there
        assert src.wait(5) and src.stats.status == MigrationStatus.FAILED
        assert src.stats.error.startswith(POSTCOPY_LOST), src.stats.error
    finally:
        proc.kill()
        proc.finish(10)
        guest.close()


def test_a_destination_whose_guest_start_fails_after_go_keeps_the_vm_paused_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its "failed" says it had started the guest (it may have run there): the source
    must not run the VM again (no rollback after "go"); it stays paused, its memory kept."""
    dest = Destination()
    guest = Guest(ENDLESS)
    real_start = Machine.start

    def start(m: Machine) -> None:
        if m is not guest.machine:  # the destination's machine
            raise MigrationError("vCPU 1 could not start (the test's)")
        real_start(m)

    monkeypatch.setattr(Machine, "start", start)
    try:
        src = _start(guest, dest.uri, Events())
        assert src.wait(30), "the source hung"
        st = src.stats
        assert st.status == MigrationStatus.FAILED, st.error
        assert st.error.startswith("the destination failed after it started the VM: "), st.error
        assert "vCPU 1 could not start" in st.error and "\n" not in st.error
        assert src.released and guest.machine.paused and guest.machine.exit is None
        assert "could not start" in str(dest.failure())
    finally:
        dest.close()
        guest.close()


def test_a_page_channel_that_failed_its_hello_rolls_back_before_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page channels' hellos (and TLS handshakes) are checked before "go": one that
    failed rolls the migration back, the VM runs on here, never lost for it."""
    real = source_side.PostcopySource._introduce

    def introduce(pc: source_side.PostcopySource, s: Any, hello: bytes) -> None:
        real(pc, s, hello)
        pc._hello_error = OSError("the TLS session was torn down (the test's)")

    monkeypatch.setattr(source_side.PostcopySource, "_introduce", introduce)
    dest = Destination()
    guest = Guest(WORKLOAD)
    try:
        src = _start(guest, dest.uri, Events())
        assert src.wait(30), "the source hung"
        st = src.stats
        assert st.status == MigrationStatus.FAILED, st.error
        assert st.error.startswith("could not open post-copy's page channels: "), st.error
        assert not src.released
        assert "abandoned" in str(dest.failure())
        assert_source_intact(guest)  # it runs on here, to its RESULT
    finally:
        dest.close()
        guest.close()


NO_UFFD = "userfaultfd(2) failed: Operation not permitted (errno 1) (the test's)"


def test_a_destination_that_cannot_do_postcopy_refuses_the_switch_before_anything_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its ``accepted`` says why: a switch asked for already fails the migration in one
    line (rolled back, the VM runs on here); one asked for later is refused when asked
    and pre-copy finishes the migration."""
    monkeypatch.setattr(reception, "postcopy_unavailable", lambda: NO_UFFD)
    dest = Destination()
    guest = Guest(WORKLOAD)
    try:
        src = _start(guest, dest.uri, Events())  # asked for in set-up
        assert src.wait(30), "the source hung"
        st = src.stats
        assert st.status == MigrationStatus.FAILED, st.error
        assert st.error == f"the destination cannot do post-copy: {NO_UFFD}"
        assert not st.postcopy.active and not src.released
        dest.failure()
        assert_source_intact(guest, finish=False)
        dest2 = Destination()
        # Round 0 at 32 MiB/s lasts over a second: the request comes during it.
        slow = MigrationParameters(peer_timeout_ms=PEER_TIMEOUT_MS, max_bandwidth=32 << 20)
        src = MigrationSource(
            guest.machine, dest2.uri, slow, MigrationCapabilities(postcopy_ram=True)
        )
        src.start()
        try:
            wait_until(lambda: src.stats.status == MigrationStatus.ACTIVE, 30, "the rounds")
            with pytest.raises(MigrationError) as e:
                src.request_postcopy()
            assert str(e.value) == (
                f"migrate-start-postcopy: the destination cannot do post-copy: {NO_UFFD}"
            )
            assert src.wait(60) and src.stats.status == MigrationStatus.COMPLETED, src.stats
            assert not src.stats.postcopy.active
            _, out = dest2.finish()
            assert out == reference_result(WORKLOAD)
        finally:
            dest2.close()
    finally:
        dest.close()
        guest.close()
