"""The post-copy data path under a real vCPU (kvm_pvm): memtouch boots on a destination
whose RAM above 16 MiB is missing; its faults (taken inside KVM_RUN) are served by the
fault server from a source page server over a socket pair, under a background push, and
the guest prints its reference RESULT."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from tests.conftest import RESULT_RE, guest_image
from tests.migration.postcopy.harness import MiB, Pair, connect, uffd_unavailable
from vmferry.machine import Machine, MachineConfig, run_to_exit
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.memory.userfaultfd import UserFault

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif((why := uffd_unavailable()) is not None, reason=f"no uffd: {why}"),
]
MEMORY = 32 * MiB
MISSING_FROM = 16 * MiB  # memtouch's working set starts here; image and page tables below
ARGS = "wss=4M rounds=2 seed=3"
BEYOND = MISSING_FROM + 4 * MiB  # past memtouch's working set


def _config() -> MachineConfig:
    return MachineConfig(memory=MEMORY, vcpus=1, image=str(guest_image("memtouch")), cmdline=ARGS)


def _result(out: io.BytesIO) -> str | None:
    found = RESULT_RE.findall(out.getvalue())
    return found[-1].decode() if found else None


def test_memtouch_on_missing_ram_served_by_the_fault_server_gives_its_result() -> None:
    out = io.BytesIO()
    with Machine.boot(_config(), serial=out) as m:
        assert run_to_exit(m, timeout=60).code == 0
    want = _result(out)
    assert want is not None
    # A freshly booted source holds zeros in the working set: that is what it serves; past
    # it (never touched by the guest) random bytes, which must land as they are.
    source, dest = GuestMemory(MEMORY), GuestMemory(MEMORY)
    rng = np.random.default_rng(5)
    source.bytes[BEYOND:] = rng.integers(0, 256, MEMORY - BEYOND, dtype=np.uint8)
    uf = UserFault()
    uf.register_memory(dest, MISSING_FROM, MEMORY - MISSING_FROM)
    pair = Pair(source, dest, uf)
    try:
        ps, fs, _ = connect(pair, max_bandwidth=8e6)  # the push needs ~2 s: the guest outruns it
        below = MISSING_FROM // PAGE_SIZE
        fs.present.mark_range(0, below)  # what boot (pre-copy, in a migration) put there
        ps.sent.mark_range(0, below)
        fs.start()
        ps.start()
        out = io.BytesIO()
        with Machine.boot(_config(), serial=out, memory=dest) as m:
            m.start()
            vcpus = {t.native_id for t in threading.enumerate() if t.name.startswith("vcpu")}
            end = m.wait(60)
            # The machine unmaps its RAM when it closes: the push lands before that.
            assert fs.wait_complete(30) and ps.wait_pushed(5)
            assert np.array_equal(dest.bytes[BEYOND:], source.bytes[BEYOND:])
        assert end is not None and end.code == 0 and _result(out) == want
        assert fs.landing.filled == ps.served.pages == (MEMORY - MISSING_FROM) // PAGE_SIZE
        assert fs.landing.already == 0 and fs.present.complete
        assert ps.served.requests > 0 and set(fs.blocktime.per_thread_s) <= vcpus
        waits = np.array(fs.blocktime.waits_s) * 1e3
        print(
            f"\nmemtouch: {ps.served.requests} requests, {ps.served.urgent_pages} urgent pages; "
            f"fault wait p50 {np.percentile(waits, 50):.2f} p99 {np.percentile(waits, 99):.2f} "
            f"max {waits.max():.1f} ms; blocktime {sum(fs.blocktime.per_thread_s.values()):.3f} s"
        )
    finally:
        pair.close()
