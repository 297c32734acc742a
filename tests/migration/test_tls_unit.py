"""TLS pieces without a VM: make-creds, key-file checks, the TLS socket pump, the
stream-size cap, and the tls-* parameters through a real controller's QMP socket."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.conftest import vmferry
from vmferry.controller import VmController
from vmferry.devices.base import DeviceIdentity
from vmferry.errors import ConfigError, MigrationError, StreamError
from vmferry.machine import MachineConfig
from vmferry.memory import GuestMemory
from vmferry.migration import streamcap
from vmferry.migration import tls as tls_mod
from vmferry.migration.channel import parse_uri
from vmferry.migration.codec import CONF, ROUND, ConfigRecord, RoundMarker
from vmferry.migration.loader import load_stream, read_head
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.ram import RamSender
from vmferry.migration.source import MigrationSource
from vmferry.migration.stream import StreamReader, StreamWriter
from vmferry.migration.streamcap import (
    CHANNEL_SKEW_ALLOWANCE,
    FIXED_ALLOWANCE,
    HEAD_LIMIT,
    StreamBudget,
)
from vmferry.migration.tls import (
    CA_CERT,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    TlsClient,
    TlsServer,
    client_for,
    parse_authz,
    server_for,
)
from vmferry.migration.tlscerts import CA_KEY, make_creds
from vmferry.migration.tlssocket import CHUNK, HANDSHAKE_LIMIT, SMALL, TlsSink, TlsSocket, TlsSource
from vmferry.migration.transport import FdSink, FdSource
from vmferry.qmp import QmpClient, QmpServer


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lab")
    make_creds(d / "host", d / "ca", ["127.0.0.1", "db.example"], "src-a")
    return d


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---- make-creds


def test_make_creds_cli_writes_qemus_files(tmp_path: Path) -> None:
    r = vmferry(
        "tls",
        "make-creds",
        str(tmp_path / "h1"),
        "--ca",
        str(tmp_path / "ca"),
        "--host",
        "10.0.0.5",
        "--host",
        "h1.example",
        "--client-name",
        "h1-source",
    )
    assert r.returncode == 0, r.stderr
    h1 = tmp_path / "h1"
    names = {CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY}
    assert {p.name for p in h1.iterdir()} == names
    for key in (SERVER_KEY, CLIENT_KEY):
        assert (h1 / key).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca" / CA_KEY).stat().st_mode & 0o777 == 0o600
    ca = _cert(h1 / CA_CERT)
    server, client = _cert(h1 / SERVER_CERT), _cert(h1 / CLIENT_CERT)
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert san.get_values_for_type(x509.DNSName) == ["h1.example"]
    cn = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "h1-source"
    # A second host of the lab: the same CA signs it.
    r = vmferry(
        "tls", "make-creds", str(tmp_path / "h2"), "--ca", str(tmp_path / "ca"), "--host", "h2"
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h2" / CA_CERT).read_bytes() == (h1 / CA_CERT).read_bytes()
    _cert(tmp_path / "h2" / SERVER_CERT).verify_directly_issued_by(ca)


def test_make_creds_expired(tmp_path: Path) -> None:
    make_creds(tmp_path / "h", tmp_path / "ca", ["h"], expired=True)
    now = datetime.datetime.now(datetime.UTC)
    for name in (SERVER_CERT, CLIENT_CERT):
        assert _cert(tmp_path / "h" / name).not_valid_after_utc < now


def test_make_creds_needs_a_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one --host"):
        make_creds(tmp_path / "h", tmp_path / "ca", [])


def _five(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_make_creds_refuses_a_hosts_directory_as_ca(tmp_path: Path) -> None:
    make_creds(tmp_path / "hostB", tmp_path / "ca", ["b"])
    before = _five(tmp_path / "hostB")
    r = vmferry(
        "tls", "make-creds", str(tmp_path / "hostD"), "--ca", str(tmp_path / "hostB"),
        "--host", "x",
    )  # fmt: skip
    assert r.returncode == 125
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "is a CA certificate without its key: a host's credentials directory?" in lines[0]
    assert _five(tmp_path / "hostB") == before  # its trust untouched, no ca-key.pem added
    assert not (tmp_path / "hostD").exists()


def test_make_creds_refuses_a_ca_directory_holding_host_files(tmp_path: Path) -> None:
    make_creds(tmp_path / "h", tmp_path / "ca", ["h"])
    shutil.copy(tmp_path / "h" / SERVER_CERT, tmp_path / "ca" / SERVER_CERT)
    with pytest.raises(ConfigError, match=r"holds a host's credentials \(server-cert.pem\)"):
        make_creds(tmp_path / "h2", tmp_path / "ca", ["h2"])


def test_make_creds_refuses_the_ca_directory_as_destination(tmp_path: Path) -> None:
    make_creds(tmp_path / "h", tmp_path / "ca", ["h"])
    with pytest.raises(ConfigError, match="must not be the CA's"):
        make_creds(tmp_path / "ca", tmp_path / "ca", ["h"])


def test_make_creds_replaces_existing_credentials_only_with_force(tmp_path: Path) -> None:
    make_creds(tmp_path / "h", tmp_path / "ca", ["h"])
    before = _five(tmp_path / "h")
    args = ["tls", "make-creds", str(tmp_path / "h"), "--ca", str(tmp_path / "ca"), "--host", "h"]
    r = vmferry(*args)
    assert r.returncode == 125
    assert len(r.stderr.strip().splitlines()) == 1
    assert "already holds credentials" in r.stderr and "--force" in r.stderr
    assert _five(tmp_path / "h") == before
    r = vmferry(*args, "--force")
    assert r.returncode == 0, r.stderr
    after = _five(tmp_path / "h")
    assert after[CA_CERT] == before[CA_CERT] and after[SERVER_CERT] != before[SERVER_CERT]


def test_make_creds_refuses_a_partial_directory_without_force(tmp_path: Path) -> None:
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / CLIENT_KEY).write_bytes(b"old")
    with pytest.raises(ConfigError, match=r"already holds credentials \(client-key.pem\)"):
        make_creds(tmp_path / "h", tmp_path / "ca", ["h"])
    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize(
    "bad", ["bad host name!", "", "-lead.example", "trail-.example", "a..b", "a_b", "x" * 64]
)
def test_make_creds_refuses_a_bad_host_name(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="not an IP address or a host name"):
        make_creds(tmp_path / "h", tmp_path / "ca", ["ok.example", bad])
    assert not (tmp_path / "h").exists()


def test_make_creds_cli_bad_host_exits_125(tmp_path: Path) -> None:
    r = vmferry(
        "tls", "make-creds", str(tmp_path / "h"), "--ca", str(tmp_path / "ca"),
        "--host", "bad host name!",
    )  # fmt: skip
    assert r.returncode == 125
    assert r.stderr.strip().splitlines() == [
        "vmferry: error: --host 'bad host name!': not an IP address or a host name "
        "(letters, digits, hyphens and dots; RFC 1123)"
    ]


@pytest.mark.parametrize("good", ["::1", "10.0.0.5", "localhost", "db-1.example.com.", "9host"])
def test_make_creds_accepts_addresses_and_host_names(tmp_path: Path, good: str) -> None:
    make_creds(tmp_path / "h", tmp_path / "ca", [good])


# ---- credentials checks


@pytest.fixture
def host(lab: Path, tmp_path: Path) -> Path:
    d = tmp_path / "host"
    shutil.copytree(lab / "host", d)
    return d


@pytest.mark.parametrize("key", [SERVER_KEY, CLIENT_KEY])
def test_world_readable_key_is_refused_naming_the_file(host: Path, key: str) -> None:
    (host / key).chmod(0o644)
    with pytest.raises(ConfigError) as info:
        TlsServer(str(host)) if key == SERVER_KEY else TlsClient(str(host), "h")
    assert str(info.value) == (
        f"TLS credentials: the private key {host / key} is readable by others "
        f"(mode 0644); run chmod 600 {host / key}"
    )


def test_group_readable_key_is_refused(host: Path) -> None:
    (host / SERVER_KEY).chmod(0o640)
    with pytest.raises(ConfigError, match="mode 0640"):
        TlsServer(str(host))


def test_missing_file_is_named(host: Path) -> None:
    (host / CA_CERT).unlink()
    with pytest.raises(ConfigError, match=f"{host / CA_CERT} is missing"):
        TlsServer(str(host))


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        TlsServer(str(tmp_path / "none"))


@pytest.mark.parametrize("cert", [SERVER_CERT, CLIENT_CERT])
def test_certificate_not_signed_by_the_ca_is_refused_naming_it(
    host: Path, tmp_path: Path, cert: str
) -> None:
    make_creds(tmp_path / "other", tmp_path / "ca-b", ["127.0.0.1"])
    shutil.copy(tmp_path / "other" / CA_CERT, host / CA_CERT)  # same CA name, other key
    with pytest.raises(ConfigError) as info:
        TlsServer(str(host)) if cert == SERVER_CERT else TlsClient(str(host), "h")
    assert str(info.value).startswith(
        f"TLS credentials: {host / cert} is not signed by the CA in {host / CA_CERT}"
    )
    assert "\n" not in str(info.value)
    # migrate-set-parameters checks the same way
    with pytest.raises(ConfigError, match="is not signed by the CA"):
        tls_mod.check_creds(str(host), server=cert == SERVER_CERT)


def test_ca_bundle_with_the_signer_is_accepted(host: Path, tmp_path: Path) -> None:
    make_creds(tmp_path / "other", tmp_path / "ca-b", ["127.0.0.1"])
    bundle = (tmp_path / "other" / CA_CERT).read_bytes() + (host / CA_CERT).read_bytes()
    (host / CA_CERT).write_bytes(bundle)
    TlsServer(str(host))
    TlsClient(str(host), "h")


def test_cli_destination_with_a_foreign_certificate_exits_125(host: Path, tmp_path: Path) -> None:
    make_creds(tmp_path / "other", tmp_path / "ca-b", ["127.0.0.1"])
    shutil.copy(tmp_path / "other" / SERVER_CERT, host / SERVER_CERT)
    shutil.copy(tmp_path / "other" / SERVER_KEY, host / SERVER_KEY)
    r = vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--tls-creds", str(host), timeout=30)
    assert r.returncode == 125
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{host / SERVER_CERT} is not signed by the CA in {host / CA_CERT}" in lines[0]


def test_cli_destination_with_a_readable_key_exits_125_in_one_line(host: Path) -> None:
    (host / SERVER_KEY).chmod(0o604)
    r = vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--tls-creds", str(host), timeout=30)
    assert r.returncode == 125
    assert r.stderr.strip().splitlines() == [
        f"vmferry: error: TLS credentials: the private key {host / SERVER_KEY} is readable "
        f"by others (mode 0604); run chmod 600 {host / SERVER_KEY}"
    ]


def test_cli_authz_without_creds(host: Path) -> None:
    r = vmferry("run", "--incoming", "tcp:127.0.0.1:0", "--tls-authz", "a", timeout=30)
    assert r.returncode == 125
    assert "--tls-authz needs --tls-creds" in r.stderr


def test_tls_on_a_file_uri_is_refused(lab: Path) -> None:
    with pytest.raises(ConfigError, match="applies to tcp: migrations"):
        client_for(str(lab / "host"), "", parse_uri("file:/tmp/x"))
    assert client_for("", "", parse_uri("tcp:h:1")) is None


def test_parse_authz() -> None:
    assert parse_authz("") == ()
    assert parse_authz(" src-a, src-b ,,") == ("src-a", "src-b")
    with pytest.raises(ConfigError, match="needs tls-creds"):
        server_for("", "src-a")


# ---- the TLS socket over a real connection


@pytest.fixture
def pair(lab: Path) -> Iterator[tuple[TlsSocket, TlsSocket]]:
    """A client and a server TlsSocket after the handshake and verdict."""
    creds = str(lab / "host")
    server, client = TlsServer(creds, ("src-a",)), TlsClient(creds, "127.0.0.1")
    a, b = socket.socketpair()
    done: list[TlsSocket] = []
    t = threading.Thread(target=lambda: done.append(server.secure(b, "source")))
    t.start()
    c = client.secure(a, 0)
    t.join(10)
    try:
        yield c, done[0]
    finally:
        c.close()
        done[0].close()


def test_pump_carries_mixed_buffers_exactly(pair: tuple[TlsSocket, TlsSocket]) -> None:
    c, s = pair
    rng = np.random.default_rng(3)
    sizes = [1, 31, SMALL - 1, SMALL, 5, CHUNK + 17, 3 * CHUNK, 200, SMALL * 2 + 3, 7]
    bufs = [rng.bytes(n) for n in sizes]
    want = b"".join(bufs)
    got = bytearray(len(want))
    src = TlsSource(s, "test stream")

    def read() -> None:
        src.readinto(memoryview(got))

    t = threading.Thread(target=read)
    t.start()
    sink = TlsSink(c)
    sink.write([memoryview(b) for b in bufs[:5]])
    sink.write([memoryview(b) for b in bufs[5:]])
    t.join(30)
    assert bytes(got) == want
    assert sink.written == len(want) == src.position


def test_reply_lines_both_ways_while_the_stream_flows(pair: tuple[TlsSocket, TlsSocket]) -> None:
    """A heartbeat on one thread, the stream on another: one TLS session, no corruption."""
    c, s = pair
    payload = np.random.default_rng(5).bytes(16 * CHUNK)
    got = bytearray(len(payload))
    lines: list[bytes] = []

    def beat() -> None:
        for i in range(200):
            s.sendall(b"alive %d\n" % i)

    def read_lines() -> None:
        buf = b""
        while buf.count(b"\n") < 200:
            chunk = c.recv(4096)
            assert chunk
            buf += chunk
        lines.extend(buf.splitlines())

    threads = [
        threading.Thread(target=beat),
        threading.Thread(target=read_lines),
        threading.Thread(target=lambda: TlsSource(s).readinto(memoryview(got))),
    ]
    for t in threads:
        t.start()
    TlsSink(c).write([payload])
    for t in threads:
        t.join(30)
    assert bytes(got) == payload
    assert lines == [b"alive %d" % i for i in range(200)]


def test_end_of_stream_is_named(pair: tuple[TlsSocket, TlsSocket]) -> None:
    c, s = pair
    c.sendall(b"abc")
    c.shutdown(socket.SHUT_WR)
    with pytest.raises(StreamError, match="main ends early at byte 3: 5 more bytes"):
        TlsSource(s, "main").readinto(memoryview(bytearray(8)))


# ---- the cap on what one round may carry


def _head(memory: int, devices: int = 0, channels: int = 1) -> ConfigRecord:
    config = MachineConfig(memory=memory, vcpus=1, image="memtouch")
    return ConfigRecord(config, channels=channels, devices=(DeviceIdentity("x", 1),) * devices)


def test_stream_cap_before_and_after_conf() -> None:
    a, b = socket.socketpair()
    with a, b:
        budget = StreamBudget()
        src = budget.source(FdSource(b.fileno(), owned=False, name="migration stream"))
        with pytest.raises(StreamError) as info:
            src.readinto(memoryview(bytearray(HEAD_LIMIT + 1)))
        assert "before the VM's configuration (CONF) is known" in str(info.value)
        assert src.position == 0  # refused before reading a byte
        budget.allow(_head(64 << 20))
        assert budget.limit == (64 << 20) + (1 << 20) + FIXED_ALLOWANCE
        budget.limit = 10  # as if the source had sent all a round of a VM that size may
        a.sendall(b"x" * 10)
        src.readinto(memoryview(bytearray(10)))
        with pytest.raises(StreamError, match="round 0 would pass 10 bytes"):
            src.readinto(memoryview(bytearray(1)))
        budget.next_round()  # an RND marker: the next round has its own allowance
        a.sendall(b"x" * 10)
        src.readinto(memoryview(bytearray(10)))


def test_stream_cap_counts_every_channel_and_device() -> None:
    budget = StreamBudget()
    budget.allow(_head(1 << 30, devices=2, channels=2))
    skew = CHANNEL_SKEW_ALLOWANCE  # one extra channel
    assert budget.limit == (1 << 30) + (16 << 20) + 2 * (4 << 30) + FIXED_ALLOWANCE + skew
    socks = [socket.socketpair() for _ in range(2)]
    try:
        srcs = [
            budget.source(FdSource(b.fileno(), owned=False, name=f"ch{i}"))
            for i, (_, b) in enumerate(socks)
        ]
        budget.limit = 6
        for a, _ in socks:
            a.sendall(b"yyy")
        for s in srcs:
            s.readinto(memoryview(bytearray(3)))
        with pytest.raises(StreamError, match="ch0: round 0 would pass 6 bytes"):
            srcs[0].readinto(memoryview(bytearray(1)))
    finally:
        for a, b in socks:
            a.close()
            b.close()


CAP_RAM = 16 << 20  # the smallest VM vmferry runs


def _load_rounds(rounds: int, sends_per_round: int) -> tuple[StreamBudget, BaseException]:
    """A real stream of a CAP_RAM VM whose every page is rewritten each round: ``rounds``
    rounds, each sending all RAM ``sends_per_round`` times, then the source goes away.
    What the destination's loader raised, and the budget it counted with."""
    memory = GuestMemory(CAP_RAM)
    memory.pages()[:] = np.random.default_rng(5).integers(
        1, 2**63, size=memory.pages().shape, dtype=np.uint64
    )
    dest = GuestMemory(CAP_RAM)
    a, b = socket.socketpair()
    config = MachineConfig(memory=CAP_RAM, vcpus=1, image="memtouch")

    def source() -> None:
        with contextlib.suppress(OSError):  # the destination may hang up first
            w = StreamWriter(FdSink(a.fileno(), owned=False))
            w.section(CONF, [ConfigRecord(config).encode()])
            sender = RamSender(w, memory)
            for n in range(rounds):
                for _ in range(sends_per_round):
                    sender.send(np.arange(memory.npages, dtype=np.int64))
                w.section(ROUND, [RoundMarker(n, memory.npages * sends_per_round).encode()])
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=source)
    t.start()
    budget = StreamBudget()
    try:
        main = StreamReader(budget.source(FdSource(b.fileno(), owned=False, name="stream")))
        head = read_head(main)
        budget.allow(head)
        with pytest.raises(StreamError) as info:
            load_stream(head, main, dest, on_round=budget.next_round)
    finally:
        b.close()
        t.join(30)
        a.close()
        memory.close()
        dest.close()
    return budget, info.value


def test_a_long_migration_is_not_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration that never converges sends RAM many times over: well past the old
    total cap of 16 × RAM (+ the fixed allowance), it is still read to the end."""
    monkeypatch.setattr(streamcap, "FIXED_ALLOWANCE", 64 << 10)
    budget, err = _load_rounds(24, 1)
    assert budget.total > 16 * CAP_RAM + (64 << 10)
    assert budget.round == 24
    assert "ends early" in str(err), err  # the source went away; the cap never struck


def test_a_round_larger_than_ram_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamcap, "FIXED_ALLOWANCE", 64 << 10)
    budget, err = _load_rounds(3, 2)  # each page twice per round: no source does that
    assert budget.round == 0
    assert "stream: round 0 would pass" in str(err), err
    assert "one round of the VM's 16777216 bytes of RAM" in str(err)


# ---- parameters through QMP, on a real controller


def test_tls_parameters_round_trip_through_qmp(lab: Path) -> None:
    d = tempfile.mkdtemp(prefix="qmp-tls-", dir="/tmp")
    try:
        path = os.path.join(d, "qmp.sock")
        controller = VmController(None)
        with QmpServer(path, controller), QmpClient(path) as qmp:
            before = qmp.execute("query-migrate-parameters")
            assert (before["tls-creds"], before["tls-hostname"], before["tls-authz"]) == (
                "",
                "",
                "",
            )
            host = str(lab / "host")
            new = {"tls-creds": host, "tls-hostname": "db", "tls-authz": "a,b"}
            qmp.execute("migrate-set-parameters", **new)
            after = qmp.execute("query-migrate-parameters")
            assert {k: after[k] for k in new} == new
            qmp.execute("migrate-set-parameters", **{"tls-creds": ""})
            assert qmp.execute("query-migrate-parameters")["tls-creds"] == ""
        assert controller.params.tls_hostname == "db"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_source_refuses_bad_creds_before_it_starts(host: Path) -> None:
    """``migrate`` fails at once (QMP error), not after the VM started dirty logging."""
    (host / CLIENT_KEY).chmod(0o666)
    with pytest.raises(ConfigError, match="readable by others"):
        # The credentials are checked before the machine is looked at.
        MigrationSource(
            None,  # type: ignore[arg-type]
            "tcp:127.0.0.1:1",
            MigrationParameters(tls_creds=str(host)),
            MigrationCapabilities(),
        )


# ---- what a stranger can make a destination read


def _server_error(lab: Path, feed: bytes, *, close: bool) -> BaseException:
    """What ``TlsServer.secure`` raised for a client that sent ``feed``."""
    server = TlsServer(str(lab / "host"))
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.secure(b, "source").close()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    with contextlib.suppress(OSError):
        a.sendall(feed)
        if close:
            a.shutdown(socket.SHUT_WR)
    t.join(30)
    a.close()
    assert errors, "the server admitted a stranger"
    return errors[0]


def test_a_handshake_that_never_ends_is_cut_at_64_kib(lab: Path) -> None:
    # A ClientHello that claims 120,000 bytes (OpenSSL would wait for all of them),
    # sent as full 16 KiB records.
    body = b"\x01" + (120_000).to_bytes(3, "big") + bytes(16_380)
    records = b"".join(b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body for _ in range(7))
    err = _server_error(lab, records, close=False)
    assert isinstance(err, MigrationError)
    assert f"the TLS handshake passed {HANDSHAKE_LIMIT} bytes" in str(err)


def test_a_silent_client_is_given_up_on(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_mod, "HANDSHAKE_TIMEOUT_S", 0.3)
    err = _server_error(lab, b"", close=False)
    assert str(err) == "no TLS handshake from the source within 0 s"


def test_garbage_that_is_not_a_vmferry_stream(lab: Path) -> None:
    err = _server_error(lab, b"GET / HTTP/1.1\r\n\r\n", close=True)
    assert str(err) == (
        "refused a migration: this destination requires TLS, but the source sent b'GET / HT'"
    )
