"""The destination side: accept a migration, load and verify it, resume only on ``go``.

Every failure is reported to the source on the reply path (so it resumes its VM) and
raised here with what went wrong; no guest is ever started from a stream that was not
read to its end and verified.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.kvm.system import DEFAULT_DEVICE
from vmferry.machine.machine import Machine
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.channel import MigrationUri, ReplyPath, accept, listen
from vmferry.migration.devices import DestinationDevices
from vmferry.migration.loader import check_loaded, load_stream, open_devices, populate, read_head
from vmferry.migration.metrics import VerifyResult
from vmferry.migration.stream import CHANNEL_GRAMMAR, StreamReader
from vmferry.migration.transport import FdSource

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 60  # no byte from the source for this long: it is gone
CHANNEL_ACCEPT_TIMEOUT_S = 10.0
GO_TIMEOUT_S = 120.0


@dataclass
class IncomingResult:
    machine: Machine
    verify: VerifyResult
    load_s: float
    rounds: int
    ram_pages: int
    timings: dict[str, float] = field(default_factory=dict)


def _recv_timeout(sock: socket.socket, seconds: int) -> None:
    # SO_RCVTIMEO makes the blocking readv(2) give up, so a vanished source is noticed.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, 0))


def _wake(sock: socket.socket) -> None:
    # Readers blocked on the socket see its end (close(2) alone does not wake them).
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


class IncomingMigration:
    """Waits on tcp:HOST:PORT for one migration and returns the running machine."""

    def __init__(
        self,
        uri: MigrationUri,
        *,
        kvm_device: str = DEFAULT_DEVICE,
        serial: BinaryIO | None = None,
        announce: bool = True,
        device_versions: dict[str, int] | None = None,
        prealloc: int = 0,
    ) -> None:
        """``prealloc``: allocate this much guest RAM now, before anything arrives (as
        QEMU's -mem-prealloc does): a fresh page costs more to receive into than the
        network does to carry it. Used if the VM that comes has exactly this size."""
        self.uri = uri
        self.kvm_device = kvm_device
        self.serial = serial
        self.announce = announce
        self.device_versions = device_versions or {}
        self.listener = listen(uri)
        self.port = self.listener.getsockname()[1]
        self._prealloc: GuestMemory | None = None
        if prealloc:
            try:
                self._prealloc = GuestMemory(prealloc)
                self._prealloc.populate()
            except BaseException:
                self.listener.close()
                if self._prealloc is not None:
                    self._prealloc.close()
                raise

    def _memory_for(self, size: int) -> GuestMemory:
        memory, self._prealloc = self._prealloc, None
        if memory is not None and memory.size == size:
            return memory
        if memory is not None:
            log.warning(
                "pre-allocated %d bytes of RAM, but the VM has %d: allocating anew",
                memory.size,
                size,
            )
            memory.close()
        return GuestMemory(size)

    def close(self) -> None:
        """Stop waiting: a ``receive`` blocked in accept returns with an error."""
        _wake(self.listener)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)

    def receive(self) -> IncomingResult:
        socks: list[socket.socket] = []
        reply: ReplyPath | None = None
        machine: Machine | None = None
        memory: GuestMemory | None = None
        devices: DestinationDevices | None = None
        try:
            if self.announce:
                print(
                    f"vmferry: waiting for a migration on {self.uri.host}:{self.port}",
                    file=sys.stderr,
                    flush=True,
                )
            main_sock = accept(self.listener, None, "source")
            socks.append(main_sock)
            _recv_timeout(main_sock, IDLE_TIMEOUT_S)
            reply = ReplyPath(main_sock)
            t0 = time.monotonic()
            main = StreamReader(FdSource(main_sock.fileno(), owned=False, name="migration stream"))
            head = read_head(main)
            readers = []
            for i in range(1, head.channels):
                s = accept(self.listener, CHANNEL_ACCEPT_TIMEOUT_S, f"channel {i}")
                socks.append(s)
                _recv_timeout(s, IDLE_TIMEOUT_S)
                readers.append(
                    StreamReader(
                        FdSource(s.fileno(), owned=False, name=f"channel {i}"), CHANNEL_GRAMMAR
                    )
                )
            memory = self._memory_for(head.config.memory)
            populate(memory, head.resident)  # no-op on pre-allocated RAM
            devices = open_devices(head, memory, self.device_versions)
            reply.send("accepted")
            loaded = load_stream(
                head, main, memory, readers, devices, wake_main=lambda: _wake(main_sock)
            )
            devices.commit()  # RESUMING → STOP: each device checks its state
            t_loaded = time.monotonic()
            machine = Machine.from_state(
                loaded.state,
                memory,
                kvm_device=self.kvm_device,
                serial=self.serial,
                devices=devices.devices,
            )
            memory = None  # the machine owns it now
            devices = None
            verify = check_loaded(loaded, machine)
            t_verified = time.monotonic()
            if verify.status == "failed":
                raise MigrationError(f"verification failed: {verify.detail}")
            reply.send(
                "ready",
                verify_ms=(t_verified - t_loaded) * 1e3,
                pages_checked=verify.pages_checked,
                verify=verify.status,
            )
            msg = reply.receive(GO_TIMEOUT_S, "go from the source")
            if msg["kind"] != "go":
                raise MigrationError(f"the source did not hand over: {msg}")
            t_go = time.monotonic()
            DestinationDevices(machine.devices).start()
            machine.start()
            t_started = time.monotonic()
            reply.send("resumed", resume_ms=(t_started - t_go) * 1e3)
            return IncomingResult(
                machine,
                verify,
                t_loaded - t0,
                loaded.rounds,
                loaded.ram.normal + loaded.ram.zero,
                {"load_s": t_loaded - t0, "verify_s": t_verified - t_loaded},
            )
        except BaseException as e:
            if reply is not None:
                with contextlib.suppress(OSError):
                    reply.send("failed", error=str(e))
            if machine is not None:
                machine.close()
            else:
                if devices is not None:
                    devices.close()
                if memory is not None:
                    memory.close()
            if isinstance(e, StreamError | MigrationError):
                raise
            if isinstance(e, VmferryError):
                raise MigrationError(str(e)) from e
            if isinstance(e, OSError):
                raise MigrationError(f"connection to the source failed: {e}") from e
            raise
        finally:
            if self._prealloc is not None:
                self._prealloc.close()
                self._prealloc = None
            for s in socks:
                _wake(s)  # a channel thread blocked on its socket returns now
                s.close()
            self.listener.close()
