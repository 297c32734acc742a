"""A QMP-compatible control socket: QEMU's protocol, vmferry's commands.

`QmpServer` serves a `QmpBackend` on a Unix socket; `QmpClient` talks to it. The commands
and their arguments are data in `vmferry.qmp.schema`.
"""

from vmferry.qmp.backend import QmpBackend, QmpError
from vmferry.qmp.client import QmpClient, QmpProtocolError
from vmferry.qmp.server import QmpServer

__all__ = ["QmpBackend", "QmpClient", "QmpError", "QmpProtocolError", "QmpServer"]
