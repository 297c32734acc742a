"""A fault server for tests and probes: serves each faulting page from a source buffer on
its own thread, and records how long each fault took to serve."""

from __future__ import annotations

import threading
import time

import numpy as np
import numpy.typing as npt

from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.memory.userfaultfd import UserFault, UserFaultError


class PageServer:
    """Serves faults at host addresses [base, base+len(source)) from ``source`` (what the
    source host would send). Latencies: from the read that returned a fault to the COPY
    that woke its waiter (per page), and the gap between successive fault reads."""

    def __init__(self, uf: UserFault, base: int, source: npt.NDArray[np.uint8]) -> None:
        self.uf = uf
        self.base = base
        self.source = source
        self._src_addr = int(source.ctypes.data)
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self.served = 0  # pages this server filled
        self.already = 0  # faulting pages found already there
        self.service_s: list[float] = []
        self.read_at: list[float] = []
        self.ptids: set[int] = set()  # threads that faulted (vCPU threads, for blocktime)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="uffd-server", daemon=True)

    def start(self) -> PageServer:
        """Start serving (again a no-op: a watchdog and the test may both call it)."""
        with self._start_lock:
            if self._thread.ident is None:
                self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.uf.wait(0.05):
                    continue
                batch = self.uf.read_faults()
                t_read = time.perf_counter()
                self.read_at.append(t_read)
                self.ptids.update(batch.ptid.tolist())
                for page in batch.pages().tolist():
                    off = page - self.base
                    if not 0 <= off < self.source.size:
                        raise UserFaultError(f"fault at {page:#x} outside the served range")
                    n = self.uf.copy(page, self._src_addr + off, PAGE_SIZE)
                    if n:
                        self.served += 1
                    else:
                        self.already += 1
                    self.service_s.append(time.perf_counter() - t_read)
        except BaseException as e:  # reported by the test, which owns the thread
            self.error = e


def percentiles_ms(samples: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max in milliseconds."""
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())
