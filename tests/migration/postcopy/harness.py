"""A post-copy pair for tests: a source page server over a small memfd of random bytes and
a destination fault server over a uffd-registered memfd, joined by socket pairs."""

from __future__ import annotations

import ctypes
import socket
import threading
from dataclasses import dataclass, field

import numpy as np

from vmferry.memory.guest_memory import GuestMemory
from vmferry.memory.userfaultfd import UserFault, UserFaultUnavailable
from vmferry.migration.postcopy.fault_server import FaultServer
from vmferry.migration.postcopy.page_server import PageServer
from vmferry.migration.transport import FdSink, FdSource

MiB = 1 << 20


def uffd_unavailable() -> str | None:
    try:
        UserFault().close()
    except UserFaultUnavailable as e:
        return str(e)
    return None


class Toucher(threading.Thread):
    """Reads 64 bytes at each RAM offset through ctypes.memmove (GIL released), as a vCPU
    would touch RAM: a missing page blocks this thread only."""

    def __init__(self, memory: GuestMemory, offsets: list[int]) -> None:
        super().__init__(daemon=True)
        self.memory, self.offsets = memory, offsets
        self.got: list[bytes] = []

    def run(self) -> None:
        buf = ctypes.create_string_buffer(64)
        for off in self.offsets:
            ctypes.memmove(buf, self.memory.host_addr + off, 64)
            self.got.append(buf.raw)


@dataclass
class Pair:
    source: GuestMemory
    dest: GuestMemory
    uf: UserFault
    sockets: list[socket.socket] = field(default_factory=list)
    page_server: PageServer | None = None
    fault_server: FaultServer | None = None
    threads: list[threading.Thread] = field(default_factory=list)  # touchers, to join

    def close(self) -> None:
        if self.fault_server is not None:
            self.fault_server.stop()
        for s in self.sockets:
            s.shutdown(socket.SHUT_RDWR)  # wakes the readers of both sides
        if self.page_server is not None:
            self.page_server.stop()
            self.page_server.join(5)
        if self.fault_server is not None:
            self.fault_server.join(5)
        self.uf.close()  # a thread still waiting on a page is released
        for t in self.threads:
            t.join(5)  # before RAM is unmapped under it
        for s in self.sockets:
            s.close()
        self.dest.close()
        self.source.close()


def make_pair(size: int = 8 * MiB, seed: int = 1) -> Pair:
    """Source RAM full of random bytes; destination RAM empty and registered missing."""
    source = GuestMemory(size)
    source.bytes[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    dest = GuestMemory(size)
    uf = UserFault()
    uf.register_memory(dest, 0, size)
    return Pair(source, dest, uf)


def connect(
    pair: Pair,
    *,
    channels: int = 1,
    vcpus: tuple[int, ...] = (),
    max_bandwidth: float | None = None,
) -> tuple[PageServer, FaultServer, socket.socket]:
    """Join a page server and a fault server (not started); ``channels=2`` gives urgent
    replies their own socket. Returns the destination's request socket too."""
    main_src, main_dst = socket.socketpair()
    pair.sockets += [main_src, main_dst]
    urgent_src, urgent_dst = main_src, main_dst
    if channels == 2:
        urgent_src, urgent_dst = socket.socketpair()
        pair.sockets += [urgent_src, urgent_dst]
    pages = [FdSource(main_dst.fileno(), owned=False, name="background pages")]
    if channels == 2:
        pages.append(FdSource(urgent_dst.fileno(), owned=False, name="urgent pages"))
    background = FdSink(main_src.fileno(), owned=False)
    # One socket: one sink object, so that the server keeps records whole on it.
    urgent = background if channels == 1 else FdSink(urgent_src.fileno(), owned=False)
    ps = PageServer(
        pair.source.bytes,
        FdSource(main_src.fileno(), owned=False, name="page requests"),
        urgent,
        background,
        max_bandwidth=max_bandwidth,
    )
    fs = FaultServer(pair.uf, pair.dest, FdSink(main_dst.fileno(), owned=False), pages, vcpus=vcpus)
    pair.page_server, pair.fault_server = ps, fs
    return ps, fs, main_dst
