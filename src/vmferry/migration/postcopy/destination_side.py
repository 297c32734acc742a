"""The destination's part of post-copy, for ``Reception`` (the receiver table's
PREPARE_POSTCOPY, GATE_DMA, AWAIT_LANDED, END_POSTCOPY, SEND_LANDED).

Before ``ready``: the owed pages are punched out of the memfd (a stale copy there would
never fault), all of guest RAM is registered with userfaultfd in missing mode, the two
page channels the source opened after its PCPY are accepted and checked (their hello
names this migration), and the fault server starts: what is not owed is present. Before
the guest starts, every device's IOMMU gets the page gate (a DMA asks for missing pages
and waits: no fault with the GIL held). Each page lands through UFFDIO_COPY from the
server's staging buffer, and with x-verify on is digested there (the landing digests the
audit compares). When the last owed page has landed: the gate comes off, RAM is
unregistered, the server stops, and ``landed`` tells the source, with the figures.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import time
from collections.abc import Callable

import numpy as np

from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.memory.dirty import Words
from vmferry.memory.guest_memory import GuestMemory
from vmferry.memory.userfaultfd import UserFault
from vmferry.migration.codec import (
    POSTCOPY_HELLO,
    ROLE_BACKGROUND,
    ROLE_RESUME,
    ROLE_URGENT,
    Landed,
    OwedRecord,
    PostcopyHello,
)
from vmferry.migration.connector import TcpAcceptor
from vmferry.migration.landing import LandingDigests
from vmferry.migration.liveness import bound_socket, receive_timeout
from vmferry.migration.postcopy.fault_server import FaultServer, LinkBroken
from vmferry.migration.postcopy.iommu_gate import DmaPageGate, gate_dma
from vmferry.migration.postcopy.pages import PresentPages, punch_runs
from vmferry.migration.postcopy.source_side import PUSH_BUFFER
from vmferry.migration.tlssocket import stream_sink, stream_source

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
WAIT_STEP_S = 0.5  # how often the wait for the last page looks whether the guest ended

# The destination's acceptor, as Reception has it: the next connection, secured.
Accept = Callable[[str], socket.socket]
Secure = Callable[[socket.socket, str], socket.socket]  # TLS on a connection, if asked


class PostcopyDestination:
    """One incoming migration's post-copy: its userfaultfd, page channels, fault server."""

    def __init__(self, memory: GuestMemory, owed: OwedRecord, timeout_s: float) -> None:
        self.memory = memory
        self.owed = owed
        self.timeout_s = timeout_s
        self.uf: UserFault | None = None
        self.server: FaultServer | None = None
        self.socks: list[socket.socket] = []
        self.gate: DmaPageGate | None = None
        self._gated: list[Machine] = []
        self.owed_pages = int(np.bitwise_count(owed.words).sum())
        self.t_go = 0.0
        self.landed_ms = 0.0
        self.prepare_ms = 0.0  # in the downtime: discard, register, accept, start
        self.discard_runs = 0
        self.holes_at_switch = 0
        # migrate-recover's listeners, handed to the receiving thread while paused.
        self._recover: queue.Queue[TcpAcceptor] = queue.Queue()
        self.recoveries = 0

    def prepare(self, accept: Accept, mig_id: str, landing: LandingDigests | None) -> None:
        """Discard the owed pages, register RAM, accept the page channels, start serving."""
        t0 = time.monotonic()
        resident = self.memory.resident_bitmap().words  # mincore: loaders are stopped
        self.discard_runs = discard_owed(self.memory, self.owed.words, resident)
        # Present: what is here and not owed. The rest that is not owed is a hole (a zero
        # page of pre-copy nothing wrote here, a page never sent): zero, but a touch
        # faults as if missing, and the fault server fills it, asking nobody.
        present = PresentPages(self.memory.npages)
        present.bitmap.words[:] = resident & ~self.owed.words
        holes = PresentPages(self.memory.npages)
        holes.bitmap.words[:] = ~resident & ~self.owed.words
        self.holes_at_switch = _trimmed(holes, self.memory.npages).count()
        self.uf = UserFault()
        self.uf.register_memory(self.memory, 0, self.memory.size)
        roles = self._accept_channels(accept, mig_id)
        urgent, background = roles[ROLE_URGENT], roles[ROLE_BACKGROUND]
        self.server = FaultServer(
            self.uf,
            self.memory,
            stream_sink(urgent),
            [stream_source(urgent, "urgent pages"), stream_source(background, "pushed pages")],
            present=present,
            holes=holes,
            on_landed=None if landing is None else landing.landed_data,
        )
        self.server.pausable = True  # a reset or silent link pauses (migrate-recover)
        self.server.peer_timeout_s = self.timeout_s
        self.server.start()
        self.prepare_ms = (time.monotonic() - t0) * 1e3

    def _accept_channels(self, accept: Accept, mig_id: str) -> dict[int, socket.socket]:
        roles: dict[int, socket.socket] = {}
        for n in range(2):
            what = f"post-copy page channel {n + 1}"
            s = accept(what)
            self.socks.append(s)
            receive_timeout(s, HELLO_TIMEOUT_S)
            raw = bytearray(POSTCOPY_HELLO.size)
            stream_source(s, what).readinto(memoryview(raw))
            hello = PostcopyHello.decode(raw, what)
            if hello.mig_id != mig_id:
                raise StreamError(f"{what} belongs to another migration ({hello.mig_id!r})")
            if hello.role in roles:
                raise StreamError(f"{what}: a second channel of role {hello.role}")
            roles[hello.role] = s
        self._bound(roles)
        return roles

    def _bound(self, roles: dict[int, socket.socket]) -> None:
        # The push never pauses for long: a silent source is noticed there (its bound);
        # the urgent channel is quiet whenever the guest asks for nothing.
        roles[ROLE_BACKGROUND].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PUSH_BUFFER)
        bound_socket(roles[ROLE_BACKGROUND], self.timeout_s)
        receive_timeout(roles[ROLE_BACKGROUND], self.timeout_s)
        bound_socket(roles[ROLE_URGENT], self.timeout_s)
        receive_timeout(roles[ROLE_URGENT], 0.0)

    # ---- the guest runs
    def gate_dma(self, machine: Machine) -> None:
        """Every device's DMA waits for the pages it touches (before the devices start)."""
        assert self.server is not None
        self.gate = DmaPageGate(self.server, timeout_s=max(10.0, 2 * self.timeout_s))
        gate_dma((d.iommu for d in machine.devices), self.gate)
        self._gated.append(machine)

    def started(self, machine: Machine) -> None:
        """The vCPU threads are known once they run: their waits are blocktime."""
        assert self.server is not None
        self.t_go = time.monotonic()
        tids = [v._thread.native_id for v in machine.vcpus]
        self.server.set_vcpus([t for t in tids if t is not None])

    def await_landed(self) -> None:
        """Until every owed page has landed; the fault server's error if it failed (the
        source lost, a bad page run)."""
        server = self.server
        assert server is not None
        try:
            while not server.wait_complete(WAIT_STEP_S):
                pass
        except LinkBroken:
            raise  # paused: a new link may come
        except VmferryError as e:
            raise MigrationError(
                f"post-copy failed before the last page landed ({e}): the guest cannot run "
                "on without its missing pages, so it was stopped here"
            ) from e
        self.landed_ms = (time.monotonic() - self.t_go) * 1e3

    # ---- a broken link (postcopy-paused)
    def recover_with(self, acceptor: TcpAcceptor) -> None:
        """migrate-recover: the source's resume comes to ``acceptor``. A try still under
        way (its acceptor closed by the caller) is cut short: paused, every socket here is
        the old link's (shut down already) or that try's, whose hello read must not hold
        the new one up for HELLO_TIMEOUT_S."""
        for s in list(self.socks):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._recover.put(acceptor)

    def await_recover(self, secure: Secure, mig_id: str) -> socket.socket:
        """The old link's channels closed and readers gone; then, per migrate-recover,
        the source's new connections (main, urgent, background, each introduced), what
        is present here sent back, the fault server on the new channels. A try that
        fails waits for the next migrate-recover. Returns the new main connection."""
        server = self.server
        assert server is not None
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        server.detach(5)
        while True:
            acceptor = self._recover.get()
            try:
                main = self._relink(acceptor, secure, mig_id)
            except (VmferryError, OSError) as e:
                log.warning("migrate-recover: the new link failed, still paused: %s", e)
                continue
            finally:
                acceptor.close()
            self.recoveries += 1
            return main

    def _relink(self, acceptor: TcpAcceptor, secure: Secure, mig_id: str) -> socket.socket:
        server = self.server
        assert server is not None
        roles: dict[int, socket.socket] = {}
        for n in range(3):
            what = f"post-copy's new channel {n + 1}"
            # The first waits for the source's migrate resume; the others follow it.
            s = secure(acceptor.accept(None if n == 0 else HELLO_TIMEOUT_S, what), what)
            self.socks.append(s)
            receive_timeout(s, HELLO_TIMEOUT_S)
            raw = bytearray(POSTCOPY_HELLO.size)
            stream_source(s, what).readinto(memoryview(raw))
            hello = PostcopyHello.decode(raw, what)
            if hello.mig_id != mig_id or hello.role in roles:
                raise StreamError(f"{what}: not this migration's, or a role twice ({hello})")
            roles[hello.role] = s
        if not server.detach(HELLO_TIMEOUT_S):  # it could land and count a page, or
            for s in roles.values():  # call the new link broken: refused before present
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            raise MigrationError(
                "a reader of the old link's page channels still runs: this recovery was "
                "refused before the present pages went (run migrate-recover again)"
            )
        main = roles[ROLE_RESUME]
        self.socks.remove(main)  # the connection's now (Reception's): end() leaves it
        with server.lock:  # the holes too: zero-filled here, never to be sent
            present = server.present.bitmap.words | server.holes.bitmap.words
        stream_sink(main).write(OwedRecord(self.memory.npages, present).encode())
        receive_timeout(main, self.timeout_s)
        self._bound(roles)
        urgent, background = roles[ROLE_URGENT], roles[ROLE_BACKGROUND]
        server.reattach(
            stream_sink(urgent),
            [stream_source(urgent, "urgent pages"), stream_source(background, "pushed pages")],
        )
        return main

    def landed(self) -> Landed:
        server = self.server
        assert server is not None
        waits = np.array(server.blocktime.waits_s, dtype=np.float64) * 1e3
        p50, p99, top = (
            (float(np.percentile(waits, 50)), float(np.percentile(waits, 99)), float(waits.max()))
            if waits.size
            else (0.0, 0.0, 0.0)
        )
        return Landed(
            server.landing.received,
            server.requests_sent,
            server.blocktime.all_blocked_s * 1e3,
            p50,
            p99,
            top,
            tuple(s * 1e3 for s in server.blocktime.vcpu_blocktime_s()),
        )

    def figures(self) -> dict[str, float]:
        """What post-copy did here: pages landed, requests, DMAs that waited for pages."""
        server, gate = self.server, self.gate
        if server is None:
            return {}
        lg = server.landing
        return {
            "owed_pages": self.owed_pages,
            "landed_pages": lg.received,
            "filled_pages": lg.filled,  # by this run's COPY (the rest: there already)
            "urgent_runs": lg.urgent_runs,
            "requests": server.requests_sent,
            "blocktime_ms": server.blocktime.all_blocked_s * 1e3,
            "landed_ms": self.landed_ms,
            "prepare_ms": self.prepare_ms,
            "discard_runs": self.discard_runs,
            "holes_at_switch": self.holes_at_switch,
            "zero_filled": server.zero_filled,
            "dma_accesses": 0 if gate is None else gate.accesses,
            "dma_waits": 0 if gate is None else gate.waited,
            "dma_wait_ms": 0.0 if gate is None else gate.waited_s * 1e3,
        }

    # ---- the end
    def end(self) -> None:
        """The gate off, the channels closed, the server stopped, RAM unregistered. Also
        after a failure: a thread waiting on a page is then released (it reads zeros of a
        VM that is stopped and discarded next)."""
        for machine in self._gated:
            gate_dma((d.iommu for d in machine.devices), None)
        self._gated = []
        if self.server is not None:
            self.server.stop()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        if self.server is not None:
            self.server.join(5)
        if self.uf is not None:
            try:
                self.uf.unregister(self.memory.host_addr, self.memory.size)
            except VmferryError as e:  # closing the fd releases the range too
                log.warning("could not unregister guest RAM from userfaultfd: %s", e)
            self.uf.close()
            self.uf = None
        for s in self.socks:
            s.close()
        self.socks = []


def discard_owed(memory: GuestMemory, owed: Words, resident: Words) -> int:
    """Punch the owed pages this memfd holds (a stale copy would never fault) out of it,
    in the fewest fallocate calls: runs merge across pages that are holes already (a
    punch there is harmless), never across a page that is held and not owed. Returns
    the calls (each costs ~10 µs even on a hole: this is in the downtime)."""
    may = owed | ~resident
    if memory.npages % 64:  # no page past the last one
        may[-1] &= np.uint64((1 << (memory.npages % 64)) - 1)
    runs = punch_runs(owed & resident, may)
    memory.discard(*runs)
    return int(runs[0].size)


def _trimmed(present: PresentPages, npages: int) -> PresentPages:
    """No bit past the last page (the complement set the tail's)."""
    tail = npages % 64
    if tail:
        present.bitmap.words[-1] &= np.uint64((1 << tail) - 1)
    return present


__all__ = ["PostcopyDestination"]
