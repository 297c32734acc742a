"""One client's QMP session: greeting, negotiation, requests to replies. No I/O.

The server owns the socket; this owns the rules. Bytes go in through `feed`, reply bytes
come out, one per request, each produced only when the caller asks for it, so a reply is
written before the next command runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from vmferry import __version__
from vmferry.errors import VmferryError
from vmferry.qmp.backend import QmpBackend, QmpError
from vmferry.qmp.framing import JsonSplitter, Oversized, decode, encode
from vmferry.qmp.schema import COMMANDS, Command, Json, find_command

log = logging.getLogger(__name__)

_REQUEST_MEMBERS = ("execute", "arguments", "id")


def version_info() -> dict[str, Any]:
    # vmferry is not QEMU: it claims version 0.0.0 and says who it is in "package".
    return {"qemu": {"micro": 0, "minor": 0, "major": 0}, "package": f"vmferry {__version__}"}


def greeting() -> dict[str, Any]:
    return {"QMP": {"version": version_info(), "capabilities": []}}


def event_message(event: str, data: Mapping[str, Any] | None, now: float | None = None) -> bytes:
    """An event as sent to clients; QEMU stamps events with wall-clock time."""
    now = time.time() if now is None else now
    seconds = int(now)
    message: dict[str, Any] = {
        "event": event,
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
    }
    if data is not None:
        message["data"] = dict(data)
    return encode(message)


class QmpSession:
    """The state of one connection: before or after capabilities negotiation."""

    def __init__(self, backend: QmpBackend, backend_lock: threading.Lock) -> None:
        self._backend = backend
        # Shared by every session of a server: the backend runs one command at a time.
        self._backend_lock = backend_lock
        self._splitter = JsonSplitter()
        self.negotiated = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Reply bytes for each complete request in `data` (and what came before it)."""
        for text in self._splitter.feed(data):
            if isinstance(text, Oversized):
                yield encode(_error_reply(QmpError("JSON parse error, message too large")))
            else:
                yield _encode_reply(self.handle(text))

    def handle(self, text: bytes) -> dict[str, Any]:
        """The reply to one JSON text."""
        try:
            request = decode(text)
        except ValueError as e:
            return _error_reply(QmpError(f"JSON parse error, {e}"))
        if not isinstance(request, dict):
            return _error_reply(QmpError("QMP input must be a JSON object"))
        try:
            reply: dict[str, Any] = {"return": self._execute(request)}
        except QmpError as e:
            reply = _error_reply(e)
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    def _execute(self, request: dict[str, Json]) -> Json:
        name, arguments = _parse_request(request)
        # Until negotiation, qmp_capabilities is the only command there is.
        if not self.negotiated and name != "qmp_capabilities":
            raise QmpError(
                "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
            )
        command = find_command(name)
        method = self._method(command)
        if command.method is not None and method is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        args = command.check_arguments(arguments)
        if method is None:
            return self._builtin(name, args)
        with self._backend_lock:
            try:
                result = method(**command.to_call(args))
            except QmpError:
                raise
            except VmferryError as e:
                # A lower layer's refusal (a device, the host's vGPUs): its words, as QEMU's
                # Error becomes a GenericError; no traceback, it is not a fault here.
                raise QmpError(str(e)) from e
            except Exception as e:
                # A broken backend must not take the connection down with it.
                log.exception("QMP command %s failed", name)
                raise QmpError(str(e) or type(e).__name__) from e
        return command.to_return(result)

    def _method(self, command: Command) -> Any:
        return None if command.method is None else getattr(self._backend, command.method, None)

    def _builtin(self, name: str, args: dict[str, Json]) -> Json:
        if name == "qmp_capabilities":
            if self.negotiated:
                raise QmpError(
                    "Capabilities negotiation is already complete, command ignored",
                    "CommandNotFound",
                )
            for capability in args.get("enable", []):
                # The greeting offers none (no out-of-band execution).
                raise QmpError(f"Capability '{capability}' not available")
            self.negotiated = True
            return {}
        if name == "query-commands":
            return [{"name": c.name} for c in COMMANDS.values() if self._implemented(c)]
        if name == "query-version":
            return version_info()
        raise AssertionError(f"command {name} has neither a backend method nor a builtin")

    def _implemented(self, command: Command) -> bool:
        return command.method is None or self._method(command) is not None


def _parse_request(request: dict[str, Json]) -> tuple[str, dict[str, Json]]:
    """The command name and arguments, after QEMU's checks of the request's shape."""
    if "execute" not in request:
        raise QmpError("QMP input member 'execute' is missing")
    name = request["execute"]
    if not isinstance(name, str):
        raise QmpError("QMP input member 'execute' must be a string")
    arguments = request.get("arguments", {})
    if not isinstance(arguments, dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    for member in request:
        if member not in _REQUEST_MEMBERS:
            raise QmpError(f"QMP input member '{member}' is unexpected")
    return name, arguments


def _encode_reply(reply: dict[str, Any]) -> bytes:
    try:
        return encode(reply)
    except (TypeError, ValueError) as e:
        # A backend returned something JSON cannot carry; the client still gets an answer.
        log.error("QMP reply cannot be encoded: %s", e)
        error = _error_reply(QmpError(f"reply cannot be encoded as JSON: {e}"))
        if "id" in reply:
            error["id"] = reply["id"]
        return encode(error)


def _error_reply(error: QmpError) -> dict[str, Any]:
    return {"error": {"class": error.error_class, "desc": error.desc}}
