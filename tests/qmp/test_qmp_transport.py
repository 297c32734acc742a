"""The socket and its threads: many clients, closing, stale files, framing."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from tests.qmp.fakes import FakeVm
from tests.qmp.wire import RawConnection
from vmferry.qmp import QmpClient, QmpProtocolError, QmpServer


def test_many_clients_in_parallel_threads(server: QmpServer) -> None:
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            with QmpClient(server.path, timeout=10) as client:
                for _ in range(20):
                    assert client.execute("query-version")["package"].startswith("vmferry")
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert failures == []


def test_clients_one_after_another(server: QmpServer) -> None:
    for _ in range(3):
        with QmpClient(server.path) as client:
            assert client.execute("query-status")["running"] is True


def test_close_hangs_up_and_removes_the_socket(sock_path: str, vm: FakeVm) -> None:
    srv = QmpServer(sock_path, vm)
    srv.start()
    raw = RawConnection(sock_path)
    srv.close()
    assert raw.reader.readline() == b""
    raw.close()
    assert not os.path.exists(sock_path)
    with pytest.raises(OSError):
        QmpClient(sock_path)
    srv.close()  # twice is harmless


def test_stale_socket_is_replaced_but_other_files_are_not(sock_path: str, vm: FakeVm) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: what a crashed VMM leaves
    with QmpServer(sock_path, vm), QmpClient(sock_path) as client:
        assert client.execute("query-status")["running"] is True
        with pytest.raises(FileExistsError, match="in use"):
            QmpServer(sock_path, vm).start()
    with open(sock_path, "w"):
        pass
    with pytest.raises(FileExistsError, match="not a socket"):
        QmpServer(sock_path, vm).start()


def test_quit_may_close_the_server_from_its_own_thread(sock_path: str) -> None:
    class QuittingVm(FakeVm):
        server: QmpServer | None = None

        def quit(self) -> None:
            assert self.server is not None
            self.server.close()

    vm = QuittingVm()
    srv = QmpServer(sock_path, vm)
    vm.server = srv
    srv.start()
    with QmpClient(sock_path) as client, pytest.raises(QmpProtocolError, match="closed"):
        client.execute("quit")
    assert not os.path.exists(sock_path)


# --- framing -------------------------------------------------------------------------


def test_messages_framed_by_json_not_by_lines(server: QmpServer) -> None:
    raw = RawConnection(server.path)
    try:
        raw.send(b'{"execute": "qmp_capabilities", "id": 1}{"execute": "stop", "id": 2}\n')
        assert raw.read() == {"return": {}, "id": 1}
        assert raw.read() == {"return": {}, "id": 2}
        raw.send(b'{"execute":\n "cont",')
        raw.send(b' "id": "a}\\"{"}')
        assert raw.read() == {"return": {}, "id": 'a}"{'}
    finally:
        raw.close()
