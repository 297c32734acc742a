"""A whole migration over the in-memory link (``socket_link``): extra channels, a
stranger refused on the way, and TLS, all without a TCP port."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RESULT_RE
from vmferry.machine import Machine, MachineConfig
from vmferry.migration.codec import MAGIC
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.tls import server_for
from vmferry.migration.tlscerts import make_creds
from vmferry.testing.harness import InProcessDestination, migrate
from vmferry.testing.transport import LinkAcceptor, socket_link

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

# Paced (≈ 3 s), so that it is migrated while it runs, then ends on the destination.
MEMTOUCH = "wss=4M pattern=random seed=5 rounds=48 rate=64"


@pytest.fixture
def guest() -> Iterator[Machine]:
    config = MachineConfig(memory=64 << 20, vcpus=1, image="memtouch", cmdline=MEMTOUCH)
    with Machine.boot(config, serial=io.BytesIO()) as m:
        m.start()
        yield m


def _completes(m: Machine, dest: InProcessDestination, params: MigrationParameters) -> None:
    """Migrate with extra channels; the guest ends well on the destination."""
    caps = MigrationCapabilities(multifd=True, x_verify=True)
    run = migrate(m, destination=dest, params=params, caps=caps)
    try:
        assert run.completed, (run.stats.status, run.stats.error, run.error)
        assert run.result is not None and run.result.verify.status == "passed"
        assert dest.port == 0, "the destination listened on a port"
        acceptor = dest.incoming.acceptor
        assert isinstance(acceptor, LinkAcceptor)
        assert acceptor.connections >= params.multifd_channels
        ex = run.result.machine.wait(60)
        assert ex is not None and ex.code == 0, ex
        assert RESULT_RE.findall(dest.serial.getvalue())
    finally:
        run.close()


def test_a_small_guest_migrates_over_the_link_without_a_tcp_port(guest: Machine) -> None:
    _completes(guest, InProcessDestination(link=socket_link()), MigrationParameters())


def test_a_stranger_on_the_link_is_refused_and_the_source_still_comes_in(
    guest: Machine,
) -> None:
    link = socket_link()
    dest = InProcessDestination(link=link)
    stranger = link[0].connect(0, 1.0)
    try:
        stranger.sendall(b"GET / HTTP/1.1\r\n\r\n")
        stranger.settimeout(10)
        assert b"not a vmferry stream" in stranger.recv(4096)  # told why, on its reply path
    finally:
        stranger.close()
    _completes(guest, dest, MigrationParameters())
    assert dest.incoming.refusals == [
        "refused a connection from a local socket: not a vmferry stream: it starts with "
        f"b'GET / HT', want {MAGIC!r}"
    ], dest.incoming.refusals


def test_tls_runs_over_the_link(guest: Machine, tmp_path: Path) -> None:
    """TLS needs a stream socket, not TCP: every channel is TLS, mutually authenticated."""
    creds = tmp_path / "creds"
    make_creds(creds, tmp_path / "ca", ["127.0.0.1", "localhost"], "source-a")
    dest = InProcessDestination(link=socket_link(), tls=server_for(str(creds), "source-a"))
    _completes(guest, dest, MigrationParameters(tls_creds=str(creds)))
