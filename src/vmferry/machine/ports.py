"""Port I/O: the bus and the three platform devices (COM1 output, debug exit, halt)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO, Protocol

COM1_BASE = 0x3F8
COM1_LSR = COM1_BASE + 5
LSR_THR_EMPTY = 0x60  # THRE | TEMT: the transmitter is always ready
DEBUG_EXIT_PORT = 0xF4  # QEMU: -device isa-debug-exit,iobase=0xf4,iosize=0x04
HALT_PORT = 0x4F0
PARK_FOREVER = 0


class PortDevice(Protocol):
    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int, vcpu: int) -> None: ...


class IoBus:
    """Port ranges to devices. Unclaimed ports read all-ones and ignore writes, like a PC."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, PortDevice]] = []

    def register(self, base: int, length: int, device: PortDevice) -> None:
        for b, n, _ in self._ranges:
            if base < b + n and b < base + length:
                raise ValueError(f"ports {base:#x}+{length} overlap {b:#x}+{n}")
        self._ranges.append((base, length, device))

    def find(self, port: int) -> PortDevice | None:
        for base, length, dev in self._ranges:
            if base <= port < base + length:
                return dev
        return None

    def read(self, port: int, size: int) -> int:
        dev = self.find(port)
        return dev.read(port, size) if dev else (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int, vcpu: int) -> None:
        dev = self.find(port)
        if dev:
            dev.write(port, size, value, vcpu)


class SerialConsole:
    """COM1, output only: bytes go to a stream; the line status always says 'ready'."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._lock = threading.Lock()
        self.captured = bytearray()
        self._stopped = False

    def read(self, port: int, size: int) -> int:
        return LSR_THR_EMPTY if port == COM1_LSR else 0

    def write(self, port: int, size: int, value: int, vcpu: int) -> None:
        if port != COM1_BASE:
            return
        byte = bytes([value & 0xFF])
        with self._lock:
            self.captured += byte
            if self._stopped:
                return
            try:
                self.out.write(byte)
                if byte == b"\n":
                    self.out.flush()
            except OSError as e:
                self._stop_output(e)

    def _stop_output(self, e: OSError) -> None:
        """The serial output cannot be written (its reader went away: `| head`; a full
        disk): a console is no reason to crash a vCPU. Say so once and let the guest run
        on; its exit status still tells how it ended."""
        self._stopped = True
        why = (
            "its reader went away"
            if isinstance(e, BrokenPipeError)
            else f"cannot write it: {e.strerror or e}"
        )
        print(
            f"vmferry: serial output stops here ({why}); the guest runs on",
            file=sys.stderr,
            flush=True,
        )
        # The stream may still hold unwritten bytes, flushed (and failing again) at exit;
        # with /dev/null under its descriptor they go nowhere, quietly.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)


class DebugExit:
    """The guest ends the run by writing its exit value here."""

    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self.on_exit = on_exit

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int, vcpu: int) -> None:
        self.on_exit(value, vcpu)


class HaltPort:
    """A write parks the vCPU for up to N µs (0: until woken); the vCPU thread does the wait."""

    def __init__(self, park: Callable[[int, int], None]) -> None:
        self.park = park

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int, vcpu: int) -> None:
        self.park(vcpu, value)
