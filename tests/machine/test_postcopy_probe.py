"""Post-copy's premise on this host (kvm_pvm): a vCPU that touches guest RAM registered
missing with userfaultfd waits inside KVM_RUN (GIL released) while a Python thread serves
the page, then runs on; a paused vCPU waiting on a page parks; a user-mode-only
userfaultfd is not enough for KVM."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import RESULT_RE, guest_image
from tests.memory.page_server import PageServer, percentiles_ms
from vmferry.machine import Machine, MachineConfig, run_to_exit
from vmferry.machine.state import MachineState
from vmferry.memory.guest_memory import GuestMemory
from vmferry.memory.userfaultfd import UserFault, UserFaultUnavailable

pytestmark = pytest.mark.kvm

MiB = 1 << 20
MEMORY = 32 * MiB
MISSING_FROM = 16 * MiB  # memtouch's working set starts here; image and page tables below


def _uffd_reason() -> str | None:
    try:
        UserFault().close()
    except UserFaultUnavailable as e:
        return str(e)
    return None


needs_uffd = pytest.mark.skipif(
    (why := _uffd_reason()) is not None, reason=f"no userfaultfd here: {why}"
)


def _config(args: str, *, memory: int = MEMORY, vcpus: int = 1) -> MachineConfig:
    image = str(guest_image("memtouch"))
    return MachineConfig(memory=memory, vcpus=vcpus, image=image, cmdline=args)


def _result(out: io.BytesIO) -> str | None:
    found = RESULT_RE.findall(out.getvalue())
    return found[-1].decode() if found else None


def _reference(args: str, vcpus: int = 1) -> tuple[str, float]:
    out = io.BytesIO()
    t0 = time.perf_counter()
    with Machine.boot(_config(args, vcpus=vcpus), serial=out) as m:
        assert run_to_exit(m, timeout=60).code == 0
    result = _result(out)
    assert result is not None
    return result, time.perf_counter() - t0


def _missing_above(
    memory: GuestMemory, source: npt.NDArray[np.uint8]
) -> tuple[UserFault, PageServer]:
    uf = UserFault()
    uf.register_memory(memory, MISSING_FROM, memory.size - MISSING_FROM)
    return uf, PageServer(uf, memory.host_addr + MISSING_FROM, source)


class BackgroundStream(threading.Thread):
    """Pushes pages as post-copy's background stream would, as fast as COPY goes, from the
    top of RAM down to ``low`` (away from the working set, so every guest touch faults)."""

    CHUNK = 64 << 10

    def __init__(self, uf: UserFault, base: int, source: npt.NDArray[np.uint8], low: int):
        super().__init__(daemon=True)
        self.uf, self.base, self.source, self.low = uf, base, source, low
        self.filled = 0
        self.seconds = 0.0

    def run(self) -> None:
        t0 = time.perf_counter()
        src = int(self.source.ctypes.data)
        for off in range(self.source.size - self.CHUNK, self.low - 1, -self.CHUNK):
            self.filled += self.uf.copy(self.base + off, src + off, self.CHUNK)
        self.seconds = time.perf_counter() - t0


@needs_uffd
@pytest.mark.parametrize(("vcpus", "background"), [(1, False), (2, False), (1, True)])
def test_vcpu_faults_on_missing_ram_are_served_by_a_python_thread(
    vcpus: int, background: bool
) -> None:
    """memtouch's working set (4 MiB from 16 MiB) is missing: each page's first touch by a
    vCPU waits in KVM_RUN for the Python server; the guest prints its reference RESULT. With
    ``background``, a 400 MiB push runs at the same time (the fault path under load)."""
    args = "wss=4M rounds=2 seed=3"
    want, plain_s = _reference(args, vcpus)
    size = 512 * MiB if background else MEMORY
    memory = GuestMemory(size)
    source = np.zeros(size - MISSING_FROM, np.uint8)
    uf, server = _missing_above(memory, source)
    stream = BackgroundStream(uf, memory.host_addr + MISSING_FROM, source, low=96 * MiB)
    server.start()
    out = io.BytesIO()
    t0 = time.perf_counter()
    try:
        with Machine.boot(_config(args, memory=size, vcpus=vcpus), serial=out, memory=memory) as m:
            if background:
                stream.start()
            end = run_to_exit(m, timeout=60)
            took = time.perf_counter() - t0
            if background:
                stream.join(60)
    finally:
        server.stop()
        uf.close()
    assert server.error is None
    assert end.code == 0 and _result(out) == want
    assert server.served == (4 * MiB) >> 12, "every working-set page faults exactly once"
    assert len(server.ptids) == vcpus, "faults name the vCPU threads that took them"
    s50, s99, smax = percentiles_ms(server.service_s)
    g50, g99, gmax = percentiles_ms(np.diff(server.read_at).tolist())
    stall = (took - plain_s) / server.served * 1e3
    bg = ""
    if background:
        assert stream.filled == source.size - 96 * MiB
        bg = f"; background {stream.filled / stream.seconds / 1e9:.2f} GB/s"
    print(
        f"\n{vcpus} vCPU(s), {server.served} faults: service p50 {s50:.3f} p99 {s99:.3f}"
        f" max {smax:.1f} ms; fault-to-fault p50 {g50:.3f} p99 {g99:.3f} max {gmax:.1f} ms;"
        f" guest stall {stall:.3f} ms/fault{bg}"
    )


@dataclass
class Destination:
    result: str | None
    served: int
    pause_s: float
    pending_after_pause: bool


def _post_copy(
    state: MachineState, snapshot: npt.NDArray[np.uint8], served: npt.NDArray[np.uint8]
) -> Destination:
    """Rebuild the VM from ``state``: RAM below 16 MiB copied in, the rest missing and served
    from ``served`` on demand. Once its vCPU waits on a page, pause it (nothing served yet,
    as after a broken link), then serve and resume."""
    memory = GuestMemory(MEMORY)
    memory.bytes[:MISSING_FROM] = snapshot[:MISSING_FROM]  # before registering: GIL held
    uf, server = _missing_above(memory, served)
    out = io.BytesIO()
    try:
        with Machine.from_state(state, memory, serial=out) as dst:
            dst.start()
            assert uf.wait(10), "the destination's vCPU never faulted"
            # Should pause hang on the waiting vCPU, serving unblocks it and the assert
            # below reports it, rather than the test run hanging.
            watchdog = threading.Timer(5.0, server.start)
            watchdog.start()
            t0 = time.perf_counter()
            dst.pause()
            pause_s = time.perf_counter() - t0
            watchdog.cancel()
            pending = uf.wait(0)
            server.start()
            dst.resume()
            end = dst.wait(60)
    finally:
        server.stop()
        uf.close()
    assert server.error is None
    assert end is not None and end.code == 0, end
    return Destination(_result(out), server.served, pause_s, pending)


@needs_uffd
@pytest.mark.slow
def test_post_copy_from_a_paused_source_gives_the_reference_result() -> None:
    """The source runs memtouch into its last round; its RAM above 16 MiB reaches the
    destination only as the destination's vCPU faults on it, and the guest prints the
    reference RESULT. The same pages served as zeros give another RESULT: what the server
    copies is what the guest reads. A vCPU paused while it waits on a page parks at once."""
    args = "wss=8M rounds=2 seed=9"
    want, _ = _reference(args)
    with Machine.boot(_config(args + " rate=8"), serial=io.BytesIO()) as src:
        src.start()
        time.sleep(1.5)  # round 0 takes about 1 s at 8 MB/s: pause inside round 1
        src.pause()
        assert src.exit is None, "the source finished before the switch"
        state = src.save_state()
        snapshot = src.memory.bytes.copy()
    dst = _post_copy(state, snapshot, snapshot[MISSING_FROM:])
    assert dst.result == want
    assert dst.pause_s < 2, f"pausing a vCPU that waits on a missing page took {dst.pause_s} s"
    assert 0 < dst.served <= (8 * MiB) >> 12
    zeros = _post_copy(state, snapshot, np.zeros(MEMORY - MISSING_FROM, np.uint8))
    assert zeros.result is not None and zeros.result != want
    print(
        f"\npost-copy: {dst.served} pages on demand; pause while waiting {dst.pause_s:.4f} s,"
        f" fault still queued after pause: {dst.pending_after_pause}"
    )


@needs_uffd
def test_a_user_mode_only_userfaultfd_fails_kvm_with_a_clear_error() -> None:
    """KVM takes guest faults in the kernel (get_user_pages): a UFFD_USER_MODE_ONLY fd does
    not handle them, and KVM_RUN fails with EFAULT instead of waiting."""
    memory = GuestMemory(MEMORY)
    uf = UserFault(user_mode_only=True)
    uf.register_memory(memory, MISSING_FROM, MEMORY - MISSING_FROM)
    try:
        with Machine.boot(_config("wss=4M rounds=1"), serial=io.BytesIO(), memory=memory) as m:
            end = run_to_exit(m, timeout=30)
    finally:
        uf.close()
    assert end.code is None and end.error is not None
    assert "KVM_RUN" in str(end.error) and "Bad address" in str(end.error)
