"""A small synchronous QMP client, for vmferry's own command line."""

from __future__ import annotations

import socket
import time
from collections import deque
from types import TracebackType
from typing import Any

from vmferry.errors import VmferryError
from vmferry.qmp.backend import QmpError
from vmferry.qmp.framing import JsonSplitter, Oversized, decode, encode


class QmpProtocolError(VmferryError):
    """The server said something that is not QMP, or hung up."""


class QmpClient:
    """Connects to `path`, reads the greeting and negotiates capabilities.

    Events that arrive while waiting for a reply are kept, in order, in `events`.
    Every read and write waits at most `timeout` seconds (None: for ever).
    """

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.events: list[dict[str, Any]] = []
        self._splitter = JsonSplitter()
        self._pending: deque[bytes] = deque()
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            self.greeting = self._read_message()
            if not isinstance(self.greeting.get("QMP"), dict):
                raise QmpProtocolError(f"{path}: not a QMP greeting: {self.greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run `command`; its "return" value, or QmpError with the server's class and text.

        QMP argument names have dashes: pass them as `**{"downtime-limit": 300}`.
        """
        self._next_id += 1
        request_id = f"vmferry-{self._next_id}"
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(encode(request))
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
                continue
            # Replies without an id answer requests the server could not read; none of
            # ours, since this client writes one request at a time, so it is this one.
            if message.get("id", request_id) != request_id:
                raise QmpProtocolError(f"reply to another request: {message}")
            if "error" in message:
                error = message["error"]
                raise QmpError(str(error.get("desc")), str(error.get("class")))
            if "return" not in message:
                raise QmpProtocolError(f"neither a reply nor an event: {message}")
            return message["return"]

    def wait_event(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """The first event called `name`, kept or yet to come; it is taken out of `events`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        previous = self._sock.gettimeout()
        try:
            while True:
                for i, event in enumerate(self.events):
                    if event.get("event") == name:
                        return self.events.pop(i)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no {name} event within {timeout} s")
                    self._sock.settimeout(left)
                message = self._read_message()
                if "event" not in message:
                    raise QmpProtocolError(f"unrequested reply: {message}")
                self.events.append(message)
        finally:
            self._sock.settimeout(previous)

    def close(self) -> None:
        self._sock.close()

    def _read_message(self) -> dict[str, Any]:
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise QmpProtocolError("QMP server closed the connection")
            for text in self._splitter.feed(data):
                if isinstance(text, Oversized):
                    raise QmpProtocolError("QMP server sent an oversized message")
                self._pending.append(text)
        text = self._pending.popleft()
        try:
            message = decode(text)
        except ValueError as e:
            raise QmpProtocolError(f"QMP server sent bad JSON: {e}") from e
        if not isinstance(message, dict):
            raise QmpProtocolError(f"QMP server sent a non-object: {message!r}")
        return message
