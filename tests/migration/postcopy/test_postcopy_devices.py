"""Post-copy with devices doing DMA across the switch: dmatest's dmaengine and gpujob's
vGPU keep working on the destination while their pages are still owed — each DMA asks
for the pages it touches through the IOMMU's page gate and waits for them — and the
guest prints its reference RESULT there, the audit after the last page passed."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RESULT_RE
from tests.migration.postcopy.harness import uffd_unavailable
from vmferry.devices.vgpu import mdev
from vmferry.devices.vgpu.registers import COMPLETED
from vmferry.machine import Machine, MachineConfig, run_to_exit
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.postcopy import page_server
from vmferry.migration.source import MigrationSource
from vmferry.migration.status import MigrationStatus
from vmferry.testing.harness import InProcessDestination, migrate

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(240),  # two references and a migration, each bounded
    pytest.mark.skipif((why := uffd_unavailable()) is not None, reason=f"no uffd: {why}"),
]
MEMORY = 128 << 20


@pytest.fixture(autouse=True)
def mdev_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VMFERRY_STATE_DIR", str(tmp_path / "state"))
    yield


# The background push's cap (until the source passes its own): DMA must find owed pages
# still missing (uncapped, a few thousand owed pages landed before a DMA touched one).
PUSH_CAP = 16 << 20


@pytest.fixture(autouse=True)
def _capped_push(monkeypatch: pytest.MonkeyPatch) -> None:
    real = page_server.PageServer.__init__

    def init(server: page_server.PageServer, *args: Any, **kw: Any) -> None:
        kw["max_bandwidth"] = kw.get("max_bandwidth") or PUSH_CAP
        real(server, *args, **kw)

    monkeypatch.setattr(page_server.PageServer, "__init__", init)


def _result(out: io.BytesIO) -> str | None:
    found = RESULT_RE.findall(out.getvalue())
    return found[-1].decode() if found else None


def _reference(cfg: MachineConfig) -> str:
    out = io.BytesIO()
    with Machine.boot(cfg, serial=out) as m:
        assert run_to_exit(m, 90).code == 0, out.getvalue()
    r = _result(out)
    assert r is not None
    return r


def _ask_for_postcopy(src: MigrationSource) -> None:
    """Asked for before round 0 ends: the switch ends round 0, whatever the policy says."""
    src.request_postcopy()


CASES = {
    # ~4 s of descriptors at 20000/s: DMA runs across the switch (on a loaded host too).
    "dmatest": ("dmatest", "seed=3 rounds=1200 rate=20000", "seed=3 rounds=1200", "dmaengine"),
    # ~6 s of command buffers at 400/s; VRAM moves by pre-copy and at the switch.
    "gpujob": (
        "gpujob",
        "seed=5 rounds=2400 ws=8M rate=400",
        "seed=5 rounds=2400 ws=8M",
        "vgpu,type=vgpu-4,vram=128M",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_device_dma_across_the_switch_waits_for_its_pages_and_the_result_is_the_reference(
    case: str,
) -> None:
    image, args, ref_args, device = CASES[case]
    want = _reference(
        MachineConfig(memory=MEMORY, image=image, cmdline=ref_args, devices=(device,))
    )
    cfg = MachineConfig(memory=MEMORY, image=image, cmdline=args, devices=(device,))
    dest = InProcessDestination()  # before the guest: its run is not spent on it
    m = Machine.boot(cfg, serial=io.BytesIO())
    m.start()
    try:
        _until_dma_runs(m, case)
        run = migrate(
            m,
            destination=dest,
            params=MigrationParameters(verify="on"),
            caps=MigrationCapabilities(postcopy_ram=True),
            during=_ask_for_postcopy,
        )
        try:
            st = run.stats
            assert st.status == MigrationStatus.COMPLETED, st.error
            assert run.result is not None, run.error
            assert len(st.rounds) == 1 and st.postcopy.active and st.postcopy.owed_pages > 0
            assert st.verify.status == "passed"
            assert st.verify.phases["audit"]["pages"] == m.memory.npages
            here = run.result.postcopy
            assert here["landed_pages"] == st.postcopy.owed_pages
            # Its DMA went through the gate, and some of it had to wait for owed pages.
            assert here["dma_accesses"] > 0 and here["dma_waits"] > 0, here
            dm = run.result.machine
            ex = dm.wait(90)
            assert ex is not None and ex.code == 0, ex
            assert _result(run.destination.serial) == want
            print(
                f"\n{case}: owed {st.postcopy.owed_pages}, {st.postcopy.requests} requests, "
                f"latency {st.postcopy.latency_ms}, downtime {st.downtime_ms:.1f} ms; "
                f"destination {here}"
            )
        finally:
            run.close()
    finally:
        m.close()
        assert not mdev.list_instances(), "a transient vGPU outlived its VM"


def _until_dma_runs(m: Machine, case: str) -> None:
    deadline = time.monotonic() + 30
    done: Callable[[], bool]
    if case == "gpujob":
        done = lambda: m.devices[0].mmio_read(COMPLETED, 8) >= 128 + 1 + 7 * 50  # noqa: E731
    else:
        done = lambda: sum(getattr(d, "completed", 0) for d in m.devices) >= 200  # noqa: E731
    while not done():
        assert m.exit is None and time.monotonic() < deadline, f"{case} made no progress"
        time.sleep(0.01)
