"""Ways to talk to a QmpServer in tests: QEMU's client library, and raw bytes."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient

T = TypeVar("T")


def with_qmp(path: str, body: Callable[[QMPClient], Awaitable[T]], negotiate: bool = True) -> T:
    """Run `body` with a connected qemu.qmp client, then disconnect."""

    async def main() -> T:
        qmp = QMPClient("vmferry-test")
        qmp.negotiate = negotiate
        await qmp.connect(path)
        try:
            return await body(qmp)
        finally:
            await qmp.disconnect()

    return asyncio.run(asyncio.wait_for(main(), 10))


async def error_of(
    qmp: QMPClient, command: str, args: dict[str, Any] | None = None
) -> tuple[str, str]:
    try:
        result = await qmp.execute(command, args)
    except ExecuteError as e:
        return e.error_class, str(e)
    raise AssertionError(f"{command} succeeded with {result!r}")


async def status(qmp: QMPClient) -> dict[str, Any]:
    result = await qmp.execute("query-status")
    assert isinstance(result, dict)
    return result


class RawConnection:
    """Bytes to the server, decoded lines back: for what qemu.qmp refuses to send."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self.greeting = self.read()

    def read(self) -> Any:
        line = self.reader.readline()
        assert line.endswith(b"\n"), f"not a whole line: {line!r}"
        return json.loads(line)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ask(self, data: bytes) -> Any:
        self.send(data)
        return self.read()

    def negotiate(self) -> None:
        assert self.ask(b'{"execute": "qmp_capabilities"}\n') == {"return": {}}

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
