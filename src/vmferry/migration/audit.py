"""The audit after resume (x-verify on): the whole comparison, off the downtime.

The source never runs the guest again unless the audit fails, so its RAM is frozen: it
digests every resident page then (two threads), a chunk of MAX_AUDIT_PAGES pages at a
time, and sends each chunk as it is ready, dense (a hole's digest is 0, as a zero
page's). The destination compares each chunk with the digests it took as the pages
landed (landing.py): a page it holds data for where the source has a hole differs too.
Its verdict (``audited``) comes back on the reply path; a failed one means it has
stopped its VM, and the source runs the guest again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vmferry.errors import StreamError
from vmferry.memory.guest_memory import GuestMemory
from vmferry.migration.codec import MAX_AUDIT_PAGES, AuditChunk
from vmferry.migration.landing import LandingDigests
from vmferry.migration.verify import MAX_MISMATCHES_REPORTED, page_digests

AUDIT_THREADS = 2


def source_chunks(
    memory: GuestMemory, seed: int, chunk_pages: int = MAX_AUDIT_PAGES
) -> Iterator[tuple[AuditChunk, float]]:
    """Each chunk of the source's digests of all RAM, with the ms its digests took."""
    resident = memory.resident_pages()
    npages = memory.npages
    for lo in range(0, npages, chunk_pages):
        hi = min(lo + chunk_pages, npages)
        t0 = time.perf_counter()
        a, b = np.searchsorted(resident, [lo, hi])
        pages = resident[a:b]
        dense = np.zeros(hi - lo, dtype=np.uint64)
        if pages.size:
            dense[pages - lo] = page_digests(memory, pages, seed, AUDIT_THREADS)
        yield AuditChunk(lo, dense, hi == npages), (time.perf_counter() - t0) * 1e3


@dataclass
class AuditComparison:
    """The destination's side: the chunks in order, compared as they come."""

    landing: LandingDigests
    next_page: int = 0
    mismatched: list[int] = field(default_factory=list)  # the first few
    mismatch_count: int = 0

    def take(self, chunk: AuditChunk) -> bool:
        """Compare one chunk; True once the whole of RAM was compared."""
        if chunk.first != self.next_page:
            raise StreamError(
                f"the audit chunk at page {chunk.first} is out of order: page "
                f"{self.next_page} is due"
            )
        bad = self.landing.differing_range(chunk.first, chunk.digests)
        self.mismatch_count += int(bad.size)
        room = MAX_MISMATCHES_REPORTED - len(self.mismatched)
        self.mismatched += [int(p) for p in bad[:room]]
        self.next_page += chunk.digests.size
        return chunk.last

    @property
    def passed(self) -> bool:
        return self.mismatch_count == 0

    def detail(self) -> str:
        if self.passed:
            return ""
        shown = ", ".join(str(p) for p in self.mismatched[:8])
        more = self.mismatch_count - min(len(self.mismatched), 8)
        return f"guest RAM differs from the source's in pages {shown}" + (
            f" and {more} more" if more > 0 else ""
        )


__all__ = ["AUDIT_THREADS", "AuditComparison", "source_chunks"]
