"""The DMA gate on an Iommu over small memory: a DMA is translated first, asks for the
missing pages of every piece before waiting on any, and touches memory only once all
are present; an unanswered request is one clear timeout; an unmapped IOVA asks nothing."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.devices.iommu_layout import split_iommu
from vmferry.devices.iommu import DmaFault
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.migration.postcopy.iommu_gate import DmaPageGate, DmaPageTimeout, GatedDma
from vmferry.migration.postcopy.pages import PresentPages

MiB = 1 << 20


class FakePages:
    """A fault server's request/wait with a present record; requests are logged and, when
    ``answer`` is set, land at once (as if the source had replied)."""

    def __init__(self, npages: int, *, answer: bool = True) -> None:
        self.present = PresentPages(npages)
        self.answer = answer
        self.log: list[tuple[str, int, int]] = []

    def request(self, ram_offset: int, length: int) -> int:
        first = ram_offset // PAGE_SIZE
        count = (ram_offset + length - 1) // PAGE_SIZE - first + 1
        missing = int(self.present.unset_in(first, count)[1].sum())
        self.log.append(("request", ram_offset, length))
        if self.answer:
            self.present.mark_range(first, count)
        return missing

    def wait_present(self, ram_offset: int, length: int, timeout: float) -> bool:
        self.log.append(("wait", ram_offset, length))
        first = ram_offset // PAGE_SIZE
        return self.present.holds(first, (ram_offset + length - 1) // PAGE_SIZE - first + 1)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory(4 * MiB)
    yield mem
    mem.close()


def test_a_dma_across_two_mappings_asks_for_both_pieces_before_waiting(
    memory: GuestMemory,
) -> None:
    pages = FakePages(memory.npages)
    gate = DmaPageGate(pages)
    dma = GatedDma(split_iommu(memory), gate)
    data = np.arange(3 * PAGE_SIZE, dtype=np.uint32).astype(np.uint8)
    dma.write(0x1000_1000, data)
    assert pages.log == [
        ("request", 1 * MiB + PAGE_SIZE, PAGE_SIZE),
        ("request", 3 * MiB, 2 * PAGE_SIZE),
        ("wait", 1 * MiB + PAGE_SIZE, PAGE_SIZE),
        ("wait", 3 * MiB, 2 * PAGE_SIZE),
    ]
    assert (
        memory.bytes[MiB + PAGE_SIZE : MiB + 2 * PAGE_SIZE].tobytes() == data[:PAGE_SIZE].tobytes()
    )
    assert memory.bytes[3 * MiB : 3 * MiB + 2 * PAGE_SIZE].tobytes() == data[PAGE_SIZE:].tobytes()
    assert gate.accesses == gate.waited == 1
    assert dma.read(0x1000_1000, 3 * PAGE_SIZE).tobytes() == data.tobytes()
    assert gate.accesses == 2 and gate.waited == 1, "pages present: nothing asked, no wait"


def test_an_unanswered_request_is_one_clear_timeout_and_memory_is_not_touched(
    memory: GuestMemory,
) -> None:
    pages = FakePages(memory.npages, answer=False)
    dma = GatedDma(split_iommu(memory), DmaPageGate(pages, timeout_s=0.01))
    with pytest.raises(DmaPageTimeout) as e:
        dma.write(0x1000_0000, bytes(PAGE_SIZE))
    assert str(e.value) == (
        "DMA write 0x10000000: RAM 0x100000+0x1000 not present after 0.01 s of post-copy "
        "with the link up (the page request went unanswered)"
    )
    assert isinstance(e.value, DmaFault), "a device model sees a DMA fault, as for an unmapped IOVA"


def test_an_unmapped_iova_faults_before_any_page_is_asked_for(memory: GuestMemory) -> None:
    pages = FakePages(memory.npages)
    dma = GatedDma(split_iommu(memory), DmaPageGate(pages))
    with pytest.raises(DmaFault, match="is not mapped"):
        dma.read(0x2000_0000, 16)
    assert pages.log == []
