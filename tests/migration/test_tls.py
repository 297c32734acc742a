"""Migration over TLS with mutual authentication: a migration that arrives whole (1 and 2
channels, the reference RESULT, verification passed, the extra channel resumed), and each
refusal — plain stream, another CA, an expired certificate, a wrong host name, a client
outside tls-authz — named on both sides while the source VM runs on to its normal end.

Certificates are made here, at test time, by ``vmferry tls make-creds``' code."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import vmferry
from tests.migration import live
from tests.migration.live import (
    Destination,
    Guest,
    Workload,
    assert_source_intact,
    reference_result,
    start_migration,
    wait_migration,
)
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.source import MigrationSource
from vmferry.migration.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, TlsServer, server_for
from vmferry.migration.tlscerts import make_creds
from vmferry.qmp.client import QmpClient

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

WORKLOAD = Workload(wss="32M", seed=11, rounds=9, rate=64)  # about 4.5 s
HOSTS = ["127.0.0.1", "localhost"]


@dataclass(frozen=True)
class Creds:
    """Credentials directories for the cases: one lab CA, and a stranger's."""

    good: Path  # CA A; client CN "source-a"
    outsider: Path  # CA A; client CN "outsider"
    expired: Path  # CA A; both certificates expired yesterday
    stranger: Path  # CA B for everything
    foreign_client: Path  # trusts CA A (and B), but its client certificate is CA B's
    expired_client: Path  # trusts CA A, valid server side, client certificate expired


def _mixed(dst: Path, trust_from: Path, client_from: Path) -> Path:
    """Trust ``trust_from``'s CA, and also ``client_from``'s (a bundle): credentials whose
    certificate no CA in them signed are refused when loaded, before any handshake."""
    dst.mkdir()
    bundle = {(trust_from / CA_CERT).read_bytes(), (client_from / CA_CERT).read_bytes()}
    (dst / CA_CERT).write_bytes(b"".join(sorted(bundle)))
    for name in (CLIENT_CERT, CLIENT_KEY):
        shutil.copy(client_from / name, dst / name)
    (dst / CLIENT_KEY).chmod(0o600)
    return dst


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    d = tmp_path_factory.mktemp("tls")
    make_creds(d / "good", d / "ca-a", HOSTS, "source-a")
    make_creds(d / "outsider", d / "ca-a", HOSTS, "outsider")
    make_creds(d / "expired", d / "ca-a", HOSTS, "source-a", expired=True)
    make_creds(d / "stranger", d / "ca-b", HOSTS, "source-a")
    return Creds(
        good=d / "good",
        outsider=d / "outsider",
        expired=d / "expired",
        stranger=d / "stranger",
        foreign_client=_mixed(d / "foreign-client", d / "good", d / "stranger"),
        expired_client=_mixed(d / "expired-client", d / "good", d / "expired"),
    )


class TlsDestination(Destination):
    """``live.Destination`` with TLS required (``server`` None: a plain destination)."""

    def __init__(self, server: TlsServer | None) -> None:
        super().__init__(tls=server)


@pytest.fixture
def guest() -> Iterator[Guest]:
    reference_result(WORKLOAD)
    g = Guest(WORKLOAD)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def dest(creds: Creds) -> Iterator[TlsDestination]:
    d = TlsDestination(server_for(str(creds.good), "source-a"))
    try:
        yield d
    finally:
        d.close()


def _tls(creds_dir: Path | None, channels: int = 1, hostname: str = "") -> MigrationParameters:
    return MigrationParameters(
        multifd_channels=channels,
        tls_creds=str(creds_dir) if creds_dir else "",
        tls_hostname=hostname,
    )


def _refused(src: MigrationSource, dest: TlsDestination) -> tuple[str, str]:
    """Both sides' errors of a migration that must have failed before anything moved:
    the source's, and the destination's refusal lines (it refused and waits on)."""
    wait_migration(src)
    assert src.stats.status == "failed", src.stats.error
    assert not src.released
    deadline = time.monotonic() + 15
    while not dest.incoming.refusals and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dest.incoming.refusals, "the destination did not say it refused the connection"
    assert dest.error is None and dest.result is None, dest.error
    assert dest.waiting(), "the destination stopped waiting after refusing a stranger"
    return src.stats.error, "\n".join(dest.incoming.refusals)


# ---- migrations that arrive


@pytest.mark.parametrize("channels", [1, 2])
def test_tls_migration_arrives_whole(
    guest: Guest, dest: TlsDestination, creds: Creds, channels: int
) -> None:
    src = start_migration(
        guest,
        dest.uri,
        _tls(creds.good, channels),
        MigrationCapabilities(multifd=channels > 1),
    )
    wait_migration(src)
    assert src.stats.status == "completed", src.stats.error
    assert src.stats.verify.status == "passed"
    result, out = dest.finish()
    assert result.verify.status == "passed"
    assert out == reference_result(WORKLOAD)
    assert src.tls is not None
    hs = src.tls.handshakes
    assert [h.index for h in hs] == list(range(channels))
    # The first channel pays the full handshake; every other resumes its session.
    assert [h.resumed for h in hs] == [False] + [True] * (channels - 1)


def test_hostname_defaults_to_the_uris_host(
    guest: Guest, dest: TlsDestination, creds: Creds
) -> None:
    """localhost is in the certificate's subjectAltName as a name, 127.0.0.1 as an IP."""
    src = start_migration(guest, f"tcp:localhost:{dest.port}", _tls(creds.good))
    wait_migration(src)
    assert src.stats.status == "completed", src.stats.error
    _, out = dest.finish()
    assert out == reference_result(WORKLOAD)


# ---- refusals: named on both sides, the source VM runs on


def test_plain_stream_to_a_tls_destination(guest: Guest, dest: TlsDestination) -> None:
    src = start_migration(guest, dest.uri, _tls(None))
    src_err, dst_err = _refused(src, dest)
    assert "requires TLS" in dst_err and "plain stream" in dst_err
    assert "requires TLS" in src_err and "plain stream" in src_err
    assert_source_intact(guest)


def test_tls_stream_to_a_plain_destination(guest: Guest, creds: Creds) -> None:
    dest = TlsDestination(None)
    try:
        src = start_migration(guest, dest.uri, _tls(creds.good))
        src_err, dst_err = _refused(src, dest)
    finally:
        dest.close()
    assert "does not speak TLS" in src_err
    assert "not a vmferry stream" in dst_err
    assert_source_intact(guest)


def test_plain_destination_refuses_what_is_not_a_vmferry_stream(guest: Guest) -> None:
    """Garbage before CONF (here an HTTP request) is a stranger's: refused, and the real
    (plain) migration that comes next arrives whole."""
    dest = TlsDestination(None)
    try:
        with socket.create_connection(("127.0.0.1", dest.port)) as http:
            http.sendall(b"GET / HTTP/1.0\r\n\r\n")
            deadline = time.monotonic() + 15
            while not dest.incoming.refusals and time.monotonic() < deadline:
                time.sleep(0.02)
        assert dest.incoming.refusals, "the destination did not refuse the stranger"
        assert "not a vmferry stream: it starts with b'GET / HT'" in dest.incoming.refusals[0]
        src = start_migration(guest, dest.uri, _tls(None))
        wait_migration(src)
        assert src.stats.status == "completed", src.stats.error
        _, out = dest.finish()
    finally:
        dest.close()
    assert out == reference_result(WORKLOAD)


def test_client_certificate_from_another_ca(
    guest: Guest, dest: TlsDestination, creds: Creds
) -> None:
    src = start_migration(guest, dest.uri, _tls(creds.foreign_client))
    src_err, dst_err = _refused(src, dest)
    assert "the source certificate is not signed by this host's CA" in dst_err
    assert "does not trust this host's certificate" in src_err
    assert_source_intact(guest)


def test_server_certificate_from_another_ca(
    guest: Guest, dest: TlsDestination, creds: Creds
) -> None:
    src = start_migration(guest, dest.uri, _tls(creds.stranger))
    src_err, dst_err = _refused(src, dest)
    assert "the destination certificate is not signed by this host's CA" in src_err
    assert "the source does not trust this host's certificate" in dst_err
    assert_source_intact(guest)


def test_expired_client_certificate(guest: Guest, dest: TlsDestination, creds: Creds) -> None:
    src = start_migration(guest, dest.uri, _tls(creds.expired_client))
    src_err, dst_err = _refused(src, dest)
    assert "the source certificate has expired" in dst_err
    assert "refused this host's certificate: it has expired" in src_err
    assert_source_intact(guest)


def test_expired_server_certificate(guest: Guest, creds: Creds) -> None:
    dest = TlsDestination(server_for(str(creds.expired), ""))
    try:
        src = start_migration(guest, dest.uri, _tls(creds.good))
        src_err, dst_err = _refused(src, dest)
    finally:
        dest.close()
    assert "the destination certificate has expired" in src_err
    assert "the source refused this host's certificate: it has expired" in dst_err
    assert_source_intact(guest)


def test_wrong_host_name(guest: Guest, dest: TlsDestination, creds: Creds) -> None:
    src = start_migration(guest, dest.uri, _tls(creds.good, hostname="db.example"))
    src_err, dst_err = _refused(src, dest)
    assert "does not name the host" in src_err and "db.example" in src_err
    assert "the source refused this host's certificate" in dst_err
    assert_source_intact(guest)


def test_client_outside_tls_authz(guest: Guest, dest: TlsDestination, creds: Creds) -> None:
    src = start_migration(guest, dest.uri, _tls(creds.outsider, 2), MigrationCapabilities(True))
    src_err, dst_err = _refused(src, dest)
    want = "the source's certificate (CN='outsider') is not in tls-authz (source-a)"
    assert want in dst_err
    assert want in src_err
    assert_source_intact(guest)


# ---- through the CLI, as a user runs it


def test_cli_migration_over_tls_two_channels(creds: Creds) -> None:
    reference = reference_result(WORKLOAD)
    dst = live.Proc(
        "run",
        "--incoming",
        "tcp:127.0.0.1:0",
        "--tls-creds",
        str(creds.good),
        "--tls-authz",
        "source-a,source-b",
    )
    port = int(dst.wait_stderr(r"waiting for a migration on 127\.0\.0\.1:(\d+)").group(1))
    with live.qmp_dir() as d:
        src = live.start_source_process(WORKLOAD, d / "qmp")
        mig = vmferry(
            "migrate",
            f"tcp:127.0.0.1:{port}",
            "--qmp",
            str(d / "qmp"),
            "--channels",
            "2",
            "--tls-creds",
            str(creds.good),
        )
        src_done = src.finish()
    assert mig.returncode == 0, mig.stderr
    assert src_done.returncode == 0, src_done.stderr
    done = dst.finish()
    assert done.returncode == 0, done.stderr
    assert done.result == reference
    assert "verification passed" in done.stderr


def _tls_migration_arrives(dst: live.Proc, port: int, creds: Creds) -> None:
    """The real source's TLS migration, after the strangers, arrives with the RESULT."""
    reference = reference_result(WORKLOAD)
    with live.qmp_dir() as d:
        src = live.start_source_process(WORKLOAD, d / "qmp")
        mig = vmferry(
            "migrate", f"tcp:127.0.0.1:{port}", "--qmp", str(d / "qmp"),
            "--tls-creds", str(creds.good),
        )  # fmt: skip
        src_done = src.finish()
    assert mig.returncode == 0, mig.stderr
    assert src_done.returncode == 0, src_done.stderr
    done = dst.finish()
    assert done.returncode == 0, done.stderr
    assert done.result == reference
    assert "verification passed" in done.stderr


def test_cli_refusal_is_one_line_and_the_destination_waits_on(creds: Creds) -> None:
    dst = live.Proc("run", "--incoming", "tcp:127.0.0.1:0", "--tls-creds", str(creds.good))
    port = int(dst.wait_stderr(r"waiting for a migration on 127\.0\.0\.1:(\d+)").group(1))
    reference = reference_result(WORKLOAD)
    with live.qmp_dir() as d:
        src = live.start_source_process(WORKLOAD, d / "qmp")
        mig = vmferry("migrate", f"tcp:127.0.0.1:{port}", "--qmp", str(d / "qmp"), "--no-verify")
        src_done = src.finish()
    assert mig.returncode == 125
    assert "requires TLS" in mig.stderr
    assert src_done.returncode == 0, src_done.stderr
    assert src_done.result == reference
    line = dst.wait_stderr(r"vmferry: refused a connection from 127\.0\.0\.1:\d+: (.*)")
    assert line.group(1) == (
        "this destination requires TLS (tls-creds), but the source sent a plain stream"
    )
    assert dst.p.poll() is None, "the destination ended after refusing a stranger"
    _tls_migration_arrives(dst, port, creds)
    assert "vmferry: error:" not in dst.err.decode(), dst.err.decode()


def test_strangers_do_not_end_a_tls_destination(creds: Creds) -> None:
    """A silent connection (refused after the 10 s handshake bound), a plain HTTP request
    and a connect-and-hang-up are each refused in one line; the real source then arrives."""
    dst = live.Proc("run", "--incoming", "tcp:127.0.0.1:0", "--tls-creds", str(creds.good))
    port = int(dst.wait_stderr(r"waiting for a migration on 127\.0\.0\.1:(\d+)").group(1))
    refused = r"vmferry: refused a connection from 127\.0\.0\.1:\d+: "
    with socket.create_connection(("127.0.0.1", port)) as silent:
        dst.wait_stderr(refused + r"no TLS handshake from the source within 10 s", 20)
        assert silent.recv(100) == b""  # hung up on
    with socket.create_connection(("127.0.0.1", port)) as http:
        http.sendall(b"GET / HTTP/1.0\r\n\r\n")
        dst.wait_stderr(refused + r"this destination requires TLS, but the source sent b'GET ")
    socket.create_connection(("127.0.0.1", port)).close()
    dst.wait_stderr(refused + r"TLS with the source failed: the source closed the connection")
    assert dst.p.poll() is None, "the destination ended after refusing a stranger"
    _tls_migration_arrives(dst, port, creds)


def test_deferred_destination_takes_tls_parameters_over_qmp(creds: Creds) -> None:
    """QEMU's way: ``-incoming defer``, then migrate-set-parameters tls-creds/tls-authz,
    then migrate-incoming; the admitted source's migration arrives whole."""
    reference = reference_result(WORKLOAD)
    with live.qmp_dir() as d:
        dst = live.Proc("run", "--incoming", "defer", "--qmp", f"unix:{d / 'dst'}")
        live.wait_until(lambda: (d / "dst").exists(), 30, "the destination's QMP socket")
        with QmpClient(str(d / "dst")) as qmp:
            qmp.execute(
                "migrate-set-parameters",
                **{"tls-creds": str(creds.good), "tls-authz": "source-a"},
            )
            params = qmp.execute("query-migrate-parameters")
            assert (params["tls-creds"], params["tls-authz"]) == (str(creds.good), "source-a")
            qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = int(dst.wait_stderr(r"waiting for a migration on 127\.0\.0\.1:(\d+)").group(1))
        src = live.start_source_process(WORKLOAD, d / "src")
        mig = vmferry(
            "migrate",
            f"tcp:127.0.0.1:{port}",
            "--qmp",
            str(d / "src"),
            "--tls-creds",
            str(creds.good),
        )
        src_done = src.finish()
    assert mig.returncode == 0, mig.stderr
    assert src_done.returncode == 0, src_done.stderr
    done = dst.finish()
    assert done.returncode == 0, done.stderr
    assert done.result == reference


def test_run_tls_creds_on_a_source_sets_the_parameter(creds: Creds) -> None:
    with live.qmp_dir() as d:
        p = live.Proc(
            "run",
            "memtouch",
            "--memory",
            "64M",
            "--tls-creds",
            str(creds.good),
            "--qmp",
            f"unix:{d / 'q'}",
            "--",
            "wss=1M rounds=1000000 rate=1",
        )
        try:
            live.wait_until(lambda: (d / "q").exists(), 30, "the QMP socket")
            with QmpClient(str(d / "q")) as qmp:
                params = qmp.execute("query-migrate-parameters")
                assert (params["tls-creds"], params["tls-authz"]) == (str(creds.good), "")
                qmp.execute("quit")
        finally:
            done = p.finish(30)
    assert done.returncode == 0, done.stderr


def test_run_tls_authz_on_a_source_is_refused(creds: Creds) -> None:
    r = vmferry("run", "memtouch", "--tls-creds", str(creds.good), "--tls-authz", "a")
    assert r.returncode == 125
    assert r.stderr.strip().splitlines() == [
        "vmferry: error: --tls-authz is for a destination (--incoming): it lists the sources"
    ]


# ---- failures after the handshake: as on a plain connection


def test_cancel_mid_round_over_tls(guest: Guest, dest: TlsDestination, creds: Creds) -> None:
    """migrate_cancel wakes sends blocked in the TLS pump; the VM runs on."""
    params = MigrationParameters(
        multifd_channels=2, max_bandwidth=16_000_000, tls_creds=str(creds.good)
    )
    src = start_migration(guest, dest.uri, params, MigrationCapabilities(multifd=True))
    live.wait_until(lambda: src.stats.status == "active", 10, "the first round")
    src.cancel()
    wait_migration(src)
    assert src.stats.status == "cancelled", src.stats.error
    assert src.stats.error == "cancelled by the user"
    dest.failure()
    assert_source_intact(guest)


def test_destination_killed_mid_round_over_tls(guest: Guest, creds: Creds) -> None:
    dst = live.Proc("run", "--incoming", "tcp:127.0.0.1:0", "--tls-creds", str(creds.good))
    port = int(dst.wait_stderr(r"waiting for a migration on 127\.0\.0\.1:(\d+)").group(1))
    params = MigrationParameters(max_bandwidth=16_000_000, tls_creds=str(creds.good))
    src = start_migration(guest, f"tcp:127.0.0.1:{port}", params)
    try:
        live.wait_until(lambda: src.stats.status == "active", 10, "the first round")
        dst.kill()
        wait_migration(src)
    finally:
        dst.kill()
        dst.finish(10)
    assert src.stats.status == "failed"
    assert src.stats.error == "the destination closed the connection during round 0"
    assert_source_intact(guest)
