"""A vCPU on its own thread, as a small state machine driven by requests.

States: CREATED → RUNNING ⇄ PAUSED → STOPPED. A pause kicks the thread out of KVM_RUN
(immediate_exit + a signal), completes any pending I/O exit so the register state is
consistent, and parks the thread. While paused, callables can be run on the thread (state
capture and restore happen there, where KVM expects vCPU ioctls).
"""

from __future__ import annotations

import contextlib
import enum
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from vmferry.errors import GuestError, MachineStateError, VmferryError
from vmferry.kvm import uapi
from vmferry.kvm.vcpu import VcpuHandle
from vmferry.machine.mmio import MmioBus
from vmferry.machine.ports import IoBus

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """The kick signal must interrupt KVM_RUN, not kill the process: give it a handler."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        if threading.current_thread() is not threading.main_thread():
            raise MachineStateError(
                "the first Machine must be created on the main thread (it installs the "
                "vCPU kick signal handler)"
            )
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuRunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class VcpuThread:
    def __init__(
        self,
        handle: VcpuHandle,
        bus: IoBus,
        mmio: MmioBus,
        on_fault: Callable[[int, VmferryError], None],
    ) -> None:
        self.handle = handle
        self.index = handle.index
        self.bus = bus
        self.mmio = mmio
        self.on_fault = on_fault
        self._cond = threading.Condition()
        self._state = VcpuRunState.CREATED
        self._want = VcpuRunState.PAUSED
        self._woken = False
        self._throttle_sleep = 0.0
        self._calls: list[tuple[Callable[[VcpuHandle], Any], Future[Any]]] = []
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self._ident: int | None = None
        self.exits = 0

    @property
    def state(self) -> VcpuRunState:
        return self._state

    @property
    def requested(self) -> VcpuRunState:
        """The state last asked for (``state`` follows it within microseconds)."""
        return self._want

    # ---- requests (any thread)
    def start(self, *, running: bool) -> None:
        with self._cond:
            if self._state is not VcpuRunState.CREATED:
                raise MachineStateError(f"vCPU {self.index} is {self._state.value}, not created")
            self._want = VcpuRunState.RUNNING if running else VcpuRunState.PAUSED
        self._thread.start()

    def request(self, want: VcpuRunState) -> None:
        with self._cond:
            if self._state is VcpuRunState.STOPPED:
                if want is VcpuRunState.STOPPED:
                    return
                raise MachineStateError(f"vCPU {self.index} is stopped; it cannot be {want.value}")
            if self._want is VcpuRunState.STOPPED:
                return
            self._want = want
            if want is not VcpuRunState.RUNNING:
                self.handle.set_immediate_exit(True)
            self._cond.notify_all()
            ident = self._ident
        if want is not VcpuRunState.RUNNING and ident is not None:
            with contextlib.suppress(ProcessLookupError):  # the thread just ended
                signal.pthread_kill(ident, KICK_SIGNAL)

    def wait_settled(self, timeout: float = 10.0) -> None:
        """Wait until the thread has reached the state last requested (a vCPU asked to run
        may also have stopped: the guest ended)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._state is not self._want and not (
                self._want is VcpuRunState.RUNNING and self._state is VcpuRunState.STOPPED
            ):
                left = deadline - time.monotonic()
                if left <= 0 or (not self._thread.is_alive() and self._state is not self._want):
                    raise MachineStateError(
                        f"vCPU {self.index} did not become {self._want.value} "
                        f"(it is {self._state.value})"
                    )
                self._cond.wait(min(left, 0.1))

    def throttle(self, sleep_s: float) -> None:
        """Make the vCPU leave the guest now and stay out for ``sleep_s`` (auto-converge)."""
        with self._cond:
            if self._state is not VcpuRunState.RUNNING or self._want is not VcpuRunState.RUNNING:
                return
            self._throttle_sleep = sleep_s
            self.handle.set_immediate_exit(True)
            ident = self._ident
        if ident is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(ident, KICK_SIGNAL)

    def wake(self) -> None:
        """End a park early (the guest re-checks its condition)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def call(self, fn: Callable[[VcpuHandle], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(handle)`` on the vCPU thread while it is paused (or before it starts)."""
        with self._cond:
            if self._state is VcpuRunState.CREATED:
                return fn(self.handle)
            if self._state is not VcpuRunState.PAUSED:
                raise MachineStateError(
                    f"vCPU {self.index} is {self._state.value}; its state can only be read or "
                    "written while paused"
                )
            fut: Future[Any] = Future()
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut.result(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the thread
    def _main(self) -> None:
        self._ident = threading.get_ident()
        try:
            self._loop()
        except VmferryError as e:
            # The error goes to another thread; its traceback would keep this thread's
            # frames, and the views into the kvm_run page they hold, so the page could not
            # be unmapped when the machine closes.
            self._stop_with(e.with_traceback(None))
        except Exception as e:
            self._stop_with(VmferryError(f"vCPU {self.index} thread crashed: {e!r}"))

    def _stop_with(self, err: VmferryError) -> None:
        with self._cond:
            self._state = self._want = VcpuRunState.STOPPED
            self._cond.notify_all()
        self.on_fault(self.index, err)

    def _loop(self) -> None:
        was_running = False
        while True:
            with self._cond:
                while self._want is not VcpuRunState.RUNNING:
                    if was_running:
                        # Completes a pending I/O exit (KVM finishes it on the next entry);
                        # with immediate_exit set, KVM_RUN returns at once after that.
                        self.handle.set_immediate_exit(True)
                        self.handle.run()
                        was_running = False
                    self._state = self._want
                    self._cond.notify_all()
                    if self._want is VcpuRunState.STOPPED:
                        return
                    self._run_calls()
                    self._cond.wait()
                if self._throttle_sleep:
                    # Auto-converge: stay out of the guest for a while (a pause or stop
                    # request ends the sleep). Taken here, so a request that came while
                    # the vCPU was parked or handling an exit is not lost.
                    sleep, self._throttle_sleep = self._throttle_sleep, 0.0
                    self._cond.wait_for(lambda: self._want is not VcpuRunState.RUNNING, sleep)
                    continue
                self._state = VcpuRunState.RUNNING
                self._cond.notify_all()
                self.handle.set_immediate_exit(False)
            was_running = True
            result = self.handle.run()
            if result.interrupted:
                continue
            self.exits += 1
            self._handle_exit(result.exit_reason)

    def _run_calls(self) -> None:
        while self._calls:
            fn, fut = self._calls.pop(0)
            try:
                fut.set_result(fn(self.handle))
            except BaseException as e:
                fut.set_exception(e)

    def _handle_exit(self, reason: int) -> None:
        run = self.handle.run_state
        if reason == uapi.KVM_EXIT_IO:
            io = run.exit.io
            data = self.handle.io_data(io.data_offset, io.size * io.count)
            for k in range(io.count):
                chunk = data[k * io.size : (k + 1) * io.size]
                if io.direction == uapi.KVM_EXIT_IO_OUT:
                    self.bus.write(io.port, io.size, int.from_bytes(chunk, "little"), self.index)
                else:
                    chunk[:] = self.bus.read(io.port, io.size).to_bytes(io.size, "little")
        elif reason == uapi.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            n = min(int(mmio.len), 8)
            if mmio.is_write:
                self.mmio.write(mmio.phys_addr, n, int.from_bytes(bytes(mmio.data[:n]), "little"))
            else:
                value = self.mmio.read(mmio.phys_addr, n).to_bytes(n, "little")
                for i in range(n):
                    mmio.data[i] = value[i]
        elif reason == uapi.KVM_EXIT_HLT:
            self.park(0)
        elif reason == uapi.KVM_EXIT_SHUTDOWN:
            rip = self.handle.get_regs().rip
            raise GuestError(
                f"the guest triple-faulted: vCPU {self.index} at rip {rip:#x} (KVM exit SHUTDOWN)"
            )
        elif reason == uapi.KVM_EXIT_FAIL_ENTRY:
            raise GuestError(
                f"vCPU {self.index} failed VM entry (hardware reason "
                f"{run.exit.hardware_entry_failure_reason:#x})"
            )
        elif reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            raise GuestError(
                f"vCPU {self.index}: KVM internal error, suberror {run.exit.internal_suberror}"
            )
        else:
            name = uapi.EXIT_REASON_NAMES.get(reason, str(reason))
            raise GuestError(f"vCPU {self.index}: unexpected exit {name}")

    def park(self, max_us: int) -> None:
        """Called on this thread: wait until woken, a request, or max_us (0: no limit)."""
        deadline = time.monotonic() + max_us / 1e6 if max_us else None
        with self._cond:
            self._woken = False
            while self._want is VcpuRunState.RUNNING and not self._woken:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
