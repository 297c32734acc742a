"""The fault matrix: whatever goes wrong before the hand-over, the source VM runs on as if
nothing happened and ends with the reference RESULT, no guest starts on the destination,
and the error says what went wrong."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import xxhash

from tests.conftest import vmferry
from tests.migration import live
from tests.migration.live import (
    Destination,
    Events,
    Guest,
    Proxy,
    Workload,
    assert_source_intact,
    reference_result,
    start_migration,
    wait_migration,
    wait_until,
)
from vmferry.errors import ConfigError, MigrationError, StreamError
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.migration import codec, loader, stream
from vmferry.migration import reception as destination_mod
from vmferry.migration import source as source_mod
from vmferry.migration.channel import CHANNEL_BLOCK_SHIFT, ReplyPath
from vmferry.migration.codec import RAM_HEAD, RUN_DTYPE, RUN_ZERO
from vmferry.migration.loader import LoadedStream
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.transport import Buffer, FdSink
from vmferry.qmp.backend import QmpError
from vmferry.qmp.client import QmpClient
from vmferry.testing.transport import MemorySink

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

# Runs about 3 s (6 rounds × 32 MB at 64 MB/s): a migration fails well before it ends.
WORKLOAD = Workload(wss="32M", seed=5, rounds=9, rate=64)  # about 4.5 s
# Round 0 (the whole working set) takes about 2 s at this bandwidth: time to break it.
SLOW = MigrationParameters(max_bandwidth=16_000_000)
IMAGE_PAGE = (1 << 20) // PAGE_SIZE  # the guest's code: written once at boot, never again
WSS_FIRST_PAGE = (16 << 20) // PAGE_SIZE  # memtouch's working set starts at 16 MiB
UNTRACKED_PAGE = (128 << 20) // PAGE_SIZE  # beyond the working set: memtouch never reads it

CONN_LOST = r"reset by peer|broken pipe|closed the connection|connection lost"


@pytest.fixture
def guest() -> Iterator[Guest]:
    reference_result(WORKLOAD)  # before the clock starts
    g = Guest(WORKLOAD)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def dest() -> Iterator[Destination]:
    d = Destination()
    try:
        yield d
    finally:
        d.close()


def failed(src: source_mod.MigrationSource, status: str = "failed") -> str:
    wait_migration(src)
    assert src.stats.status == status, src.stats.error
    assert not src.released
    return src.stats.error


# ---- the destination dies


def test_nobody_listening_is_refused_at_once(guest: Guest) -> None:
    """The destination was killed before it accepted: connect is refused."""
    proc, port = live.start_destination_process()
    proc.kill()
    assert proc.finish(10).returncode == -9
    src = start_migration(guest, f"tcp:127.0.0.1:{port}")
    err = failed(src)
    assert err == f"cannot connect to the destination tcp:127.0.0.1:{port}: Connection refused"
    assert src.stats.rounds == []
    assert_source_intact(guest)


def test_destination_killed_mid_round(guest: Guest) -> None:
    proc, port = live.start_destination_process()
    try:
        src = start_migration(guest, f"tcp:127.0.0.1:{port}", SLOW)
        wait_until(lambda: src.stats.status == "active", 10, "the first round")
        time.sleep(0.4)
        assert src.stats.status == "active" and not src.stats.rounds, "round 0 ended too soon"
        proc.kill()
        err = failed(src)
    finally:
        proc.kill()
    assert proc.finish(10).returncode == -9
    # What happened, not how the socket failed ("[Errno 32] Broken pipe").
    assert err == "the destination closed the connection during round 0"
    assert_source_intact(guest)


def test_destination_killed_during_switchover(guest: Guest) -> None:
    """SIGKILL the destination the moment the source has paused the VM for the last pages."""
    proc, port = live.start_destination_process()

    def kill_at_switchover(name: str, data: dict[str, Any]) -> None:
        if data.get("status") == "device":
            proc.kill()
            proc.p.wait()

    events = Events(hook=kill_at_switchover)
    try:
        err = failed(start_migration(guest, f"tcp:127.0.0.1:{port}", events=events))
    finally:
        proc.kill()
    assert "device" in events.statuses()
    assert [n for n, _ in events.seen if n in ("STOP", "RESUME")] == ["STOP", "RESUME"]
    assert err == "the destination closed the connection during the switchover"
    assert_source_intact(guest)


def assert_connection_lost(err: str) -> None:
    assert re_search(CONN_LOST, err), err


def re_search(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.IGNORECASE) is not None


@pytest.mark.parametrize("how", ["refuses", "vanishes"])
def test_destination_fails_right_after_end(
    guest: Guest, dest: Destination, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The whole stream arrived, then the destination fails (refuses, or dies silently)."""
    real = loader.load_stream

    def broken(head: Any, main: stream.StreamReader, *a: Any, **kw: Any) -> LoadedStream:
        real(head, main, *a, **kw)
        if how == "vanishes":
            # The destination's sources are capped (streamcap): the fd is the inner one's.
            fd = main.source.inner.fd  # type: ignore[attr-defined]
            with socket.socket(fileno=socket.dup(fd)) as s:
                s.shutdown(socket.SHUT_RDWR)
        raise MigrationError("injected fault after END")

    monkeypatch.setattr(destination_mod, "load_stream", broken)
    events = Events()
    err = failed(start_migration(guest, dest.uri, events=events))
    assert "injected fault after END" in str(dest.failure())
    if how == "refuses":
        assert err == "the destination refused the VM: injected fault after END"
    else:
        assert_connection_lost(err)
    assert [n for n, _ in events.seen if n in ("STOP", "RESUME")] == ["STOP", "RESUME"]
    assert_source_intact(guest)


# ---- the connection breaks


@pytest.mark.parametrize("channels", [1, 2])
def test_connection_cut_mid_stream(guest: Guest, dest: Destination, channels: int) -> None:
    """A reset in the middle of round 0; with two channels, of the extra channel only."""
    proxy = Proxy(dest.port, conn=channels - 1, after=6 << 20)
    try:
        params = MigrationParameters(multifd_channels=channels)
        src = start_migration(guest, proxy.uri, params, MigrationCapabilities(multifd=True))
        err = failed(src)
        derr = dest.failure(30)
    finally:
        proxy.close()
    assert proxy.was_cut.is_set()
    assert_connection_lost(err)
    assert isinstance(derr, StreamError | MigrationError)
    assert re_search(r"reset by peer|ends early|truncated|ends before section", str(derr))
    assert_source_intact(guest)


@dataclass
class Tamper:
    """Flip one bit of one page's data in the first RAM section the source writes whose
    flags are ``flags`` (and that holds ``page`` with data, when given)."""

    flags: int
    page: int | None = None
    channel: int | None = None  # only on this channel (0: the main connection)
    done: bool = False
    section: int = -1  # the seq of the section that was damaged

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def apply(self, bufs: Sequence[Buffer], channel: int) -> Sequence[Buffer]:
        if self.channel not in (None, channel):
            return bufs
        if not bufs or len(bufs[0]) != codec.SECTION_HEADER_SIZE:
            return bufs
        tag, flags, _length, seq, _ = codec.SECTION_HEADER.unpack_from(bufs[0])
        if tag != codec.RAM or flags != self.flags:
            return bufs
        with self._lock:
            if self.done:
                return bufs
            payload = bytearray(b"".join(bytes(b) for b in bufs[1:]))
            at = self._where(payload)
            if at is None:
                return bufs
            payload[at] ^= 0x20
            self.done, self.section = True, seq
        return [bufs[0], payload]

    def _where(self, payload: bytearray) -> int | None:
        if self.flags & codec.FLAG_ZSTD:
            return len(payload) // 2  # somewhere in the compressed frame
        nruns, _ = RAM_HEAD.unpack_from(payload)
        runs = np.frombuffer(payload, RUN_DTYPE, count=nruns, offset=RAM_HEAD.size)
        off = RAM_HEAD.size + nruns * RUN_DTYPE.itemsize
        for first, n, fl in zip(
            runs["first"].tolist(), runs["npages"].tolist(), runs["flags"].tolist(), strict=True
        ):
            if fl & RUN_ZERO:
                continue
            if self.page is None:
                return int(off + 100)
            if first <= self.page < first + n:
                return int(off + (self.page - first) * PAGE_SIZE + 100)
            off += n * PAGE_SIZE
        return None


def tamper_with_source(monkeypatch: pytest.MonkeyPatch, tamper: Tamper) -> None:
    opened: list[int] = []

    class TamperingSink(FdSink):
        def __init__(self, fd: int, *, owned: bool = True) -> None:
            super().__init__(fd, owned=owned)
            self.channel = len(opened)  # the source opens the main connection first
            opened.append(fd)

        def write(self, bufs: Sequence[Buffer]) -> None:
            super().write(tamper.apply(bufs, self.channel))

    monkeypatch.setattr(source_mod, "FdSink", TamperingSink)


@pytest.mark.parametrize(
    ("flags", "compress", "channels"),
    [(0, "none", 1), (codec.FLAG_ZSTD, "zstd", 1), (codec.FLAG_ZSTD, "zstd", 2)],
    ids=["stop-copy-page", "zstd-frame", "zstd-frame-on-channel-1"],
)
def test_corrupt_checksummed_ram_is_refused(
    guest: Guest,
    dest: Destination,
    monkeypatch: pytest.MonkeyPatch,
    flags: int,
    compress: str,
    channels: int,
) -> None:
    """A flipped bit in RAM the checksum covers (the stop-and-copy pages, a zstd frame; on
    the main connection or on an extra channel)."""
    tamper = Tamper(flags, channel=channels - 1)
    tamper_with_source(monkeypatch, tamper)
    params = MigrationParameters(multifd_compression=compress, multifd_channels=channels)
    t0 = time.monotonic()
    err = failed(start_migration(guest, dest.uri, params, MigrationCapabilities(multifd=True)))
    assert time.monotonic() - t0 < 10, "the failure took the destination's idle timeout"
    assert tamper.done, "no RAM section to damage was sent"
    derr = dest.failure()
    assert isinstance(derr, StreamError)
    want = rf"section #{tamper.section} RAM at byte \d+: checksum mismatch, the section is corrupt"
    assert re_search(want, str(derr)), derr
    assert err == f"the destination refused the VM: {derr}"
    assert_source_intact(guest)


@pytest.mark.parametrize("mode", ["strict", "on"])
def test_corrupt_live_page_is_caught_by_verification(
    guest: Guest, dest: Destination, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A pre-copy page's data is outside the checksum (the guest may change it while it is
    sent); a page that is never sent again must then fail the digests: before resume
    (strict), or in the audit after it (on: the destination stops, the source resumes)."""
    tamper = Tamper(codec.FLAG_LIVE, page=IMAGE_PAGE)
    tamper_with_source(monkeypatch, tamper)
    err = failed(start_migration(guest, dest.uri, MigrationParameters(verify=mode)))
    assert tamper.done
    differs = f"guest RAM differs from the source's in pages {IMAGE_PAGE}"
    if mode == "strict":
        want = f"verification failed: {differs}"
        assert str(dest.failure()) == want
        assert err == f"the destination refused the VM: {want}"
    else:
        want = (
            f"verification failed after resume: {differs}; the guest was stopped here and "
            "runs on at the source"
        )
        assert str(dest.failure()) == want
        assert err == f"verification failed after resume; rolled back: pages {IMAGE_PAGE}"
    assert_source_intact(guest)


@pytest.mark.parametrize("where", ["after-conf", "mid-ram"])
def test_truncated_stream_is_refused(guest: Guest, dest: Destination, where: str) -> None:
    """The stream stops (FIN, the reply path stays open): the destination names the section
    it was reading and tells the source why."""
    proxy = TruncatingProxy(dest.port, after=None if where == "after-conf" else (5 << 20) + 123)
    try:
        err = failed(start_migration(guest, proxy.uri))
    finally:
        proxy.close()
    derr = dest.failure()
    assert isinstance(derr, MigrationError)
    # Cut after CONF the destination has accepted the VM: it reads round 0.
    assert str(derr).startswith(
        "the source closed the connection during round 0 (it stopped or was killed): "
    ), derr
    if where == "after-conf":
        want = r"stream ends before section #1 \([A-Z ]*RAM[A-Z ]*\)"
    else:
        want = r"section #\d+ RAM at byte \d+ is truncated: migration stream ends early"
    assert re_search(want, str(derr)), derr
    assert err == f"the destination refused the VM: {derr}"
    assert_source_intact(guest)


class TruncatingProxy(Proxy):
    """Passes the stream only up to ``after`` bytes (default: the end of the CONF section),
    then ends it (FIN) and swallows the rest; replies still flow back."""

    def __init__(self, target: int, after: int | None) -> None:
        super().__init__(target)
        self.after = after

    def _pump(self, a: socket.socket, b: socket.socket, index: int | None) -> None:
        if index is None:
            return super()._pump(a, b, index)
        head = bytearray()
        limit = self.after
        sent = 0
        buf = bytearray(1 << 16)
        with contextlib.suppress(OSError):
            while n := a.recv_into(buf):
                data = memoryview(buf)[:n]
                if limit is None:  # find the end of the CONF section
                    head += data
                    at = codec.STREAM_HEADER_SIZE
                    if len(head) < at + codec.SECTION_HEADER_SIZE:
                        continue
                    length = codec.SECTION_HEADER.unpack_from(head, at)[2]
                    limit = at + codec.SECTION_HEADER_SIZE + length
                    data = memoryview(head)
                if sent < limit:
                    k = min(len(data), limit - sent)
                    try:
                        b.sendall(data[:k])
                        sent += k
                        if sent == limit:
                            b.shutdown(socket.SHUT_WR)
                    except OSError:
                        sent = limit  # the destination hung up: swallow the rest


# ---- the destination refuses


@pytest.mark.parametrize("mode", ["strict", "on"])
def test_untracked_write_fails_verification(guest: Guest, dest: Destination, mode: str) -> None:
    """A write the dirty log does not see (the VMM's own mapping, as an untracked DMA) while
    the VM is paused for switchover: the page is never sent, the destination's copy is
    stale, the digests name exactly that page — before resume (strict) or in the audit
    after it (on: the page is neither in the final round nor reachable by a device) —
    and the source resumes."""

    def dma_at_switchover(name: str, data: dict[str, Any]) -> None:
        if data.get("status") == "device":
            guest.machine.memory.pages()[UNTRACKED_PAGE, 0] = 0x5EED

    events = Events(hook=dma_at_switchover)
    params = MigrationParameters(verify=mode)
    err = failed(start_migration(guest, dest.uri, params, events=events))
    differs = f"guest RAM differs from the source's in pages {UNTRACKED_PAGE}"
    if mode == "strict":
        want = f"verification failed: {differs}"
        assert str(dest.failure()) == want
        assert err == f"the destination refused the VM: {want}"
    else:
        assert str(dest.failure()).startswith(f"verification failed after resume: {differs};")
        assert err == f"verification failed after resume; rolled back: pages {UNTRACKED_PAGE}"
    assert [n for n, _ in events.seen if n in ("STOP", "RESUME")] == ["STOP", "RESUME"]
    assert_source_intact(guest)


def test_changed_vcpu_state_fails_verification(
    guest: Guest, dest: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = loader.load_stream

    def damaging(*a: Any, **kw: Any) -> LoadedStream:
        loaded = real(*a, **kw)
        loaded.state.vcpus[0].regs["rbx"] ^= 1
        return loaded

    monkeypatch.setattr(destination_mod, "load_stream", damaging)
    err = failed(start_migration(guest, dest.uri))
    want = "verification failed: the loaded vCPU state differs from the source's"
    assert str(dest.failure()) == want
    assert err == f"the destination refused the VM: {want}"
    assert_source_intact(guest)


def test_ram_changed_after_loading_fails_verification(
    guest: Guest, dest: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Destination RAM changed after the stream wrote it (and before the guest runs): the
    strict digests are of RAM as it is, so the page is named. (x-verify on compares what
    landed, as it landed: it vouches for the source, the wire and the tracking, not for a
    write on the destination after landing.)"""
    real = loader.load_stream
    page = WSS_FIRST_PAGE + 3

    def damaging(*a: Any, **kw: Any) -> LoadedStream:
        loaded = real(*a, **kw)
        loaded.memory.pages()[page, 7] ^= np.uint64(1 << 40)
        return loaded

    monkeypatch.setattr(destination_mod, "load_stream", damaging)
    err = failed(start_migration(guest, dest.uri, MigrationParameters(verify="strict")))
    want = f"verification failed: guest RAM differs from the source's in pages {page}"
    assert str(dest.failure()) == want
    assert err == f"the destination refused the VM: {want}"
    assert_source_intact(guest)


def test_incompatible_stream_version_is_refused(
    guest: Guest, dest: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source of another stream format version: the destination names both versions."""

    class FutureWriter(stream.StreamWriter):
        def __init__(self, sink: Any) -> None:  # StreamWriter's, one version up
            self.sink, self.seq, self.bytes_written = sink, 0, 0
            head = codec.STREAM_HEADER.pack(codec.MAGIC, codec.VERSION + 1, 0)
            self._emit([head + struct.pack("<Q", xxhash.xxh64_intdigest(head))])

    monkeypatch.setattr(source_mod, "StreamWriter", FutureWriter)
    err = failed(start_migration(guest, dest.uri))
    v = codec.VERSION
    want = (
        f"stream format version {v + 1} is newer than this vmferry's ({v}); use a matching vmferry"
    )
    assert str(dest.failure()) == want
    assert re_search(r"^the destination refused( the VM)?: " + re.escape(want) + "$", err), err
    assert_source_intact(guest)


def test_not_a_vmferry_destination(guest: Guest) -> None:
    """Something else listens there: it hangs up on the source."""
    with socket.create_server(("127.0.0.1", 0)) as srv:

        def answer() -> None:
            conn, _ = srv.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        err = failed(start_migration(guest, f"tcp:127.0.0.1:{srv.getsockname()[1]}"))
    assert re_search(CONN_LOST + "|malformed reply|refused", err), err
    assert_source_intact(guest)


def test_bad_uri_is_a_clear_error(guest: Guest) -> None:
    for uri in ("udp:127.0.0.1:4444", "tcp:127.0.0.1", "tcp::4444", "file:", "127.0.0.1:4444"):
        with pytest.raises(ConfigError, match=r"expected tcp:HOST:PORT or file:PATH"):
            source_mod.MigrationSource(
                guest.machine, uri, MigrationParameters(), MigrationCapabilities()
            )
    assert_source_intact(guest, finish=False)


# ---- through QMP, on a vmferry process


def test_qmp_cancel_and_bad_uri(dest: Destination) -> None:
    """migrate_cancel mid-round: status cancelled, the VM keeps running and ends with the
    reference RESULT; a bad URI is refused by QMP and by `vmferry migrate`, and changes
    nothing."""
    w = WORKLOAD
    ref = reference_result(w)
    with live.qmp_dir() as d:
        qmp_path = d / "src.qmp"
        proc = live.start_source_process(w, qmp_path)
        try:
            bad = vmferry("migrate", "--qmp", str(qmp_path), "udp:127.0.0.1:4444", timeout=30)
            assert bad.returncode == 125
            assert bad.stderr.strip().splitlines()[-1] == (
                "vmferry: error: migration URI 'udp:127.0.0.1:4444': "
                "expected tcp:HOST:PORT or file:PATH"
            )
            with QmpClient(str(qmp_path)) as qmp:
                with pytest.raises(QmpError, match="expected tcp:HOST:PORT or file:PATH"):
                    qmp.execute("migrate", uri="tcp:nowhere")
                assert qmp.execute("query-status")["status"] == "running"
                qmp.execute("migrate-set-parameters", **{"max-bandwidth": SLOW.max_bandwidth})
                qmp.execute("migrate", uri=dest.uri)
                deadline = time.monotonic() + 10
                while qmp.execute("query-migrate").get("status") != "active":
                    assert time.monotonic() < deadline, "the migration never became active"
                    time.sleep(0.02)
                time.sleep(0.3)
                qmp.execute("migrate_cancel")
                deadline = time.monotonic() + 10
                while (info := qmp.execute("query-migrate")).get("status") != "cancelled":
                    assert info.get("status") == "cancelling", info  # until the VM runs on
                    assert time.monotonic() < deadline, "the cancel did not take"
                    time.sleep(0.02)
                # Not "cancelled ([Errno 104] Connection reset by peer)".
                assert info.get("error-desc") == "cancelled by the user", info
                status = qmp.execute("query-status")
                assert status["running"] and status["status"] == "running", status
            derr = dest.failure(30)
            # The source said why before it hung up (ABRT), not "the stream ends early".
            assert str(derr) == "the source cancelled the migration (cancelled by the user)"
        finally:
            res = proc.finish()
    assert res.returncode == 0, res.stderr
    assert res.result == ref
    assert "migrated" not in res.stderr


# ---- and then it works


def test_a_second_attempt_after_a_failure_succeeds(guest: Guest) -> None:
    proc, port = live.start_destination_process()
    try:
        src = start_migration(guest, f"tcp:127.0.0.1:{port}", SLOW)
        wait_until(lambda: src.stats.status == "active", 10, "the first round")
        time.sleep(0.3)
        proc.kill()
        failed(src)
    finally:
        proc.kill()
    assert_source_intact(guest, finish=False)
    dest = Destination()
    try:
        src2 = start_migration(guest, dest.uri)
        wait_migration(src2)
        assert src2.stats.status == "completed", src2.stats.error
        assert src2.stats.verify.status == "passed"
        result, printed = dest.finish()
    finally:
        dest.close()
    assert result.verify.status == "passed"
    assert printed == reference_result(WORKLOAD)
    assert guest.machine.paused and guest.machine.exit is None  # postmigrate: never again


# ---- a bad extra channel while the main stream is idle


def test_bad_extra_channel_fails_the_destination_at_once(dest: Destination) -> None:
    """A corrupt section on channel 1 while the main connection carries nothing (its pages
    are all sent): the destination must not wait for the main stream's idle timeout."""
    config = Workload().config()
    with socket.create_connection(("127.0.0.1", dest.port)) as main:
        w = stream.StreamWriter(FdSink(main.fileno(), owned=False))
        w.section(codec.CONF, [codec.ConfigRecord(config, "m1", channels=2).encode()])
        with socket.create_connection(("127.0.0.1", dest.port)) as ch:
            sink = MemorySink()
            w1 = stream.StreamWriter(sink)
            w1.section(codec.CHAN, [codec.ChannelRecord("m1", 1).encode()])
            ch.sendall(sink.data)
            time.sleep(0.5)  # the destination now waits on both connections
            sink.data.clear()
            runs = np.zeros(1, RUN_DTYPE)
            # A page of channel 1's own blocks (2 MiB blocks alternate between 2 channels).
            runs["first"], runs["npages"] = 1 << CHANNEL_BLOCK_SHIFT, 1
            page = bytes(range(256)) * (PAGE_SIZE // 256)
            w1.section(codec.RAM, [RAM_HEAD.pack(1, 0), runs.tobytes(), page])
            sink.data[-100] ^= 1  # in the page: the checksum no longer matches
            ch.sendall(sink.data)
            t0 = time.monotonic()
            derr = dest.failure(30)
            took = time.monotonic() - t0
            replies = ReplyPath(main)
            while isinstance(
                reply := replies.receive(5, "the destination's verdict"),
                codec.Accepted | codec.Alive,  # Alive: the destination's heartbeat
            ):
                pass
    chan = len(codec.ChannelRecord("m1", 1).encode())
    at = codec.STREAM_HEADER_SIZE + codec.SECTION_HEADER_SIZE + chan  # RAM follows CHAN
    want = f"section #1 RAM at byte {at}: checksum mismatch, the section is corrupt"
    assert str(derr) == want
    assert reply == codec.Failed(want)
    assert took < 5, f"the destination noticed only after {took:.0f} s"
