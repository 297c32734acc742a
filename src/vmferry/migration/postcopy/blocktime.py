"""How long threads waited for pages during post-copy, with QEMU's meanings.

QEMU's ``postcopy-blocktime`` (query-migrate, capability of the same name) is the total
time during which *every* vCPU was blocked on a missing page at once: the guest made no
progress at all. ``postcopy-vcpu-blocktime`` is a list, per vCPU, of the total time that
vCPU was blocked (its own waits, overlapping the others' or not). Both in milliseconds
there; seconds here. A wait starts when the fault server reads the fault (as QEMU's fault
thread stamps it) and ends when the page it waits on has landed.

Threads that are not vCPUs (a device model's DMA, a test's toucher) are kept per thread
too, but never count towards "every vCPU blocked". Pure: times are passed in.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class Blocktime:
    vcpus: frozenset[int]  # vCPU thread ids (the ptid a fault names)
    per_thread_s: dict[int, float] = field(default_factory=dict)
    all_blocked_s: float = 0.0  # postcopy-blocktime
    waits_s: list[float] = field(default_factory=list)  # each wait, fault to landing
    _since: dict[int, tuple[int, float]] = field(default_factory=dict)  # tid → (page, t)
    _all_since: float | None = None

    @classmethod
    def of(cls, vcpus: Collection[int]) -> Blocktime:
        return cls(frozenset(vcpus))

    def _vcpus_blocked(self) -> int:
        return sum(1 for tid in self._since if tid in self.vcpus)

    def blocked(self, tid: int, page: int, t: float) -> None:
        """``tid`` faulted on ``page`` at ``t`` (a repeat while waiting keeps its start)."""
        if tid in self._since:
            self._since[tid] = (page, self._since[tid][1])
            return
        self._since[tid] = (page, t)
        if self.vcpus and self._all_since is None and self._vcpus_blocked() == len(self.vcpus):
            self._all_since = t

    def landed(self, first: int, count: int, t: float) -> int:
        """Pages [first, first+count) arrived at ``t``: their waiters run again. Returns
        how many threads that released (the waiting threads are few: a loop over them)."""
        done = [tid for tid, (page, _) in self._since.items() if first <= page < first + count]
        if not done:
            return 0
        if self._all_since is not None and any(tid in self.vcpus for tid in done):
            self.all_blocked_s += t - self._all_since
            self._all_since = None
        for tid in done:
            _, since = self._since.pop(tid)
            self.per_thread_s[tid] = self.per_thread_s.get(tid, 0.0) + (t - since)
            self.waits_s.append(t - since)
        return len(done)

    @property
    def waiting(self) -> int:
        return len(self._since)

    def vcpu_blocktime_s(self) -> list[float]:
        """postcopy-vcpu-blocktime: per vCPU, in thread-id order."""
        return [self.per_thread_s.get(tid, 0.0) for tid in sorted(self.vcpus)]
