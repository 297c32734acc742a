"""The SR-IOV virtual function: an X710-style VF as a device model (docs/devices/nic.md).

The RX/TX engine runs on a worker thread and does all its DMA through the IOMMU: it
writes received frames into the buffers the guest posted and writes back descriptor
status; it reads the frames the guest queued for transmit and hands them to the host
switch. RUNNING_P2P stops RX DMA (frames wait in the switch's port buffer) and drains TX;
STOP does no DMA. RX_BUF_SIZE is write-only and ICR clears on read, so the saved state
comes from the register shadows.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from vmferry.devices.base import DeviceError, DeviceIdentity, DeviceModel, OutputGate
from vmferry.devices.fsm import MigCap, MigState
from vmferry.devices.iommu import DirtyTracking, DmaFault, Iommu
from vmferry.devices.nic import regs as r
from vmferry.devices.nic.host import HostConfig, current_host
from vmferry.devices.nic.rings import Ring, RxMediator
from vmferry.devices.nic.switch import host_switch
from vmferry.devices.stream import PIECE_FINAL, PIECE_INITIAL
from vmferry.errors import ConfigError
from vmferry.memory.guest_memory import PAGE_SIZE
from vmferry.sizes import parse_size

BATCH = 64  # descriptors per ring per pass: the lock is held for one pass
# ``x-dma-window=START:END``: the VF's IOMMU domain maps only these GPAs (tests: pages no
# device can reach, which only the post-resume audit checks).
DMA_WINDOW_OPTION = "x-dma-window"
RUNNING_STATES = (MigState.RUNNING, MigState.PRE_COPY)
STATUS = struct.Struct("<Q")


class VirtualFunction(DeviceModel):
    model: ClassVar[str] = "vf"
    version: ClassVar[int] = 1
    caps: ClassVar[MigCap] = MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY
    model_options: ClassVar[frozenset[str]] = frozenset(
        {"pf", "index", "migration", DMA_WINDOW_OPTION}
    )
    tracking_modes: ClassVar[frozenset[DirtyTracking]] = frozenset(DirtyTracking)

    def __init__(self, name: str, iommu: Iommu, options: dict[str, str]) -> None:
        super().__init__(name, iommu, options)
        self.pf = options.get("pf", "pf0")
        try:
            self.index = int(options.get("index", "0"))
        except ValueError:
            raise ConfigError(f"vf: index={options['index']} is not a number") from None
        if options.get("migration", "on") not in ("on", "off"):
            raise ConfigError(f"vf: migration={options['migration']}: use on or off")
        window = options.get(DMA_WINDOW_OPTION)
        self.window = None if window is None else _map_window(iommu, window)
        self.host = current_host()
        _, vf = HostConfig(self.host).claim(self.pf, self.index, os.getpid())
        self.name = f"{name} ({self.pf} VF {self.index})"
        self.mac = r.parse_mac(vf.mac)
        self.vlan = vf.vlan
        self.queues = vf.queues
        if options.get("migration", "on") == "off":
            # A VF whose driver has no migration support: no VFIO migration feature at
            # all, which the engine turns into a blocker naming this device.
            self.caps = MigCap(0)  # type: ignore[misc]
        self.switch = host_switch(self.host, self.pf)
        self._cv = threading.Condition()
        self._accepting = True
        self._busy = False
        self._alive = True
        self._loaded = False  # state came from a migration: announce when it runs
        self._mediator = RxMediator()
        self._reset_registers()
        self.port = self.switch.attach(self.mac, self.vlan, self._kick)
        self._worker = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._worker.start()

    def set_state(self, target: MigState) -> None:
        if not self.caps & MigCap.STOP_COPY:
            # No migration feature: staying RUNNING is all it can do (a rollback asks that).
            if target is self.state:
                return
            raise DeviceError(f"{self.name} does not support migration")
        super().set_state(target)

    def _reset_registers(self) -> None:
        self.ctrl = self.rx_buf_size = self.icr = self.error_code = 0
        self.stats_regs = dict.fromkeys(r.STAT_NAMES, 0)
        self.rx = [Ring() for _ in range(self.queues)]
        self.tx = [Ring() for _ in range(self.queues)]

    def close(self) -> None:
        with self._cv:
            self._alive = False
            self._cv.notify_all()
        self._worker.join(5)
        self.switch.detach(self.port)
        HostConfig(self.host).release(self.pf, self.index, os.getpid())

    def _kick(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ---- registers
    def mmio_read(self, offset: int, size: int) -> int:
        if size == 8:
            return self.mmio_read(offset, 4) | (self.mmio_read(offset + 4, 4) << 32)
        with self._cv:
            return self._read32(offset)

    def _read32(self, off: int) -> int:
        fixed = {
            r.REG_ID: r.ID,
            r.REG_NUM_QUEUES: self.queues,
            r.REG_CTRL: self.ctrl,
            r.REG_MAC_LO: int.from_bytes(self.mac[:4], "little"),
            r.REG_MAC_HI: int.from_bytes(self.mac[4:], "little"),
            r.REG_PORT_VLAN: self.vlan,
            r.REG_RX_BUF_SIZE: 0,  # write-only
            r.REG_ERROR_CODE: self.error_code,
        }
        if off in fixed:
            return fixed[off]
        if off == r.REG_VERSION:
            return self.identity.version
        if off == r.REG_STATUS:
            link = r.STATUS_LINK_UP if self.ctrl & r.CTRL_ENABLE else 0
            return link | (r.STATUS_ERROR if self.error_code else 0)
        if off == r.REG_ICR:
            value, self.icr = self.icr, 0  # clear on read
            return value
        if r.REG_STATS <= off < r.REG_STATS + 8 * len(r.STAT_NAMES):
            value = self.stats_regs[r.STAT_NAMES[(off - r.REG_STATS) // 8]]
            return (value >> (32 if off % 8 else 0)) & 0xFFFFFFFF
        q, reg = divmod(off - r.QUEUE_BASE, r.QUEUE_STRIDE)
        if off >= r.QUEUE_BASE and q < self.queues:
            ring = self.tx[q] if reg >= r.Q_TX_BASE else self.rx[q]
            reg = reg - r.Q_TX_BASE if reg >= r.Q_TX_BASE else reg
            if reg in (r.Q_RX_BASE, r.Q_RX_BASE + 4):
                return (ring.base >> (8 * reg)) & 0xFFFFFFFF
            regs = {r.Q_RX_LEN: ring.len, r.Q_RX_HEAD: ring.head, r.Q_RX_TAIL: ring.tail}
            if reg in regs:
                return regs[reg]
            if reg == r.Q_RX_ENABLE:
                return int(ring.enabled)
        return 0xFFFFFFFF

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.mmio_write(offset, 4, value & 0xFFFFFFFF)
            self.mmio_write(offset + 4, 4, value >> 32)
            return
        value &= 0xFFFFFFFF
        with self._cv:
            self._write32(offset, value)
            self._cv.notify_all()

    def _write32(self, off: int, value: int) -> None:
        if off == r.REG_CTRL:
            if value & r.CTRL_ENABLE and not self.ctrl & r.CTRL_ENABLE:
                self.error_code = r.ERR_NONE  # re-enabling clears an error
            self.ctrl = value & (r.CTRL_ENABLE | r.CTRL_BROADCAST)
            return
        if off == r.REG_RX_BUF_SIZE:
            if value % 128 or not r.MIN_RX_BUF <= value <= r.MAX_RX_BUF:
                self.error_code = r.ERR_BAD_RING
            else:
                self.rx_buf_size = value
            return
        q, reg = divmod(off - r.QUEUE_BASE, r.QUEUE_STRIDE)
        if off < r.QUEUE_BASE or q >= self.queues:
            return
        is_tx = reg >= r.Q_TX_BASE
        ring = self.tx[q] if is_tx else self.rx[q]
        reg = reg - r.Q_TX_BASE if is_tx else reg
        if reg in (r.Q_RX_BASE, r.Q_RX_BASE + 4) and not ring.enabled:
            shift = 8 * reg
            ring.base = (ring.base & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif reg == r.Q_RX_LEN and not ring.enabled:
            ring.len = value
        elif reg == r.Q_RX_ENABLE:
            self._enable(q, ring, bool(value & 1), is_tx)
        elif reg == r.Q_RX_TAIL and ring.enabled:
            if value >= ring.len:
                self.error_code = r.ERR_BAD_RING
            elif is_tx:
                ring.tail = value
            else:
                try:
                    slots = ring.fetch(self.iommu, value)  # the doorbell: descriptors fetched
                    self._mediator.fetched(ring, slots, self._buf_size())
                except DmaFault:
                    self.error_code = r.ERR_DMA_FAULT

    def _enable(self, q: int, ring: Ring, on: bool, is_tx: bool) -> None:
        if on == ring.enabled:
            return
        if on and not ring.valid():
            self.error_code = r.ERR_BAD_RING
            return
        if not on and not is_tx:
            self._mediator.queue_reset(q, ring, self._buf_size())
        ring.enabled = on
        ring.reset()

    def _buf_size(self) -> int:
        return self.rx_buf_size or r.MAX_RX_BUF

    # ---- the engine
    def _can_rx(self) -> bool:
        frame = self.switch.peek(self.port)
        if frame is None:
            return False
        ring = self.rx[self._steer(frame)]
        return not ring.enabled or ring.in_flight() > 0  # (a disabled queue drops it)

    def _ready(self) -> bool:
        if not (self._accepting and self.ctrl & r.CTRL_ENABLE and not self.error_code):
            return False
        return any(t.enabled and t.head != t.tail for t in self.tx) or self._can_rx()

    def _steer(self, frame: bytes) -> int:
        """RSS-like: the flow (source MAC and the first payload word) picks the queue."""
        return zlib.crc32(frame[6:12] + frame[14:18]) % self.queues if self.queues > 1 else 0

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._alive and not self._ready():
                    self._cv.wait(0.05)
                if not self._alive:
                    return
                self._busy = True
                out = self._tx_pass()
                self._rx_pass()
            for frame in out:  # outside the lock: a local port's wake takes its lock
                self.switch.transmit(self.port, frame)
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _tx_pass(self, limit: int = BATCH) -> list[bytes]:
        out: list[bytes] = []
        for ring in self.tx:
            n = 0
            while ring.enabled and ring.head != ring.tail and n < limit and not self.error_code:
                desc = ring.desc_addr(ring.head)
                try:
                    addr, cmd = r.DESC.unpack(self.iommu.read(desc, r.DESC_SIZE).tobytes())
                    length = cmd & 0xFFFF
                    if not cmd & r.TXD_EOP or not r.MIN_FRAME <= length <= r.MAX_FRAME:
                        self.error_code = r.ERR_BAD_TX_DESC
                        self.stats_regs["tx_errors"] += 1
                        break
                    out.append(self.iommu.read(addr, length).tobytes())
                    self.iommu.write(desc + 8, STATUS.pack(cmd | r.TXD_DD))
                except DmaFault:
                    self.error_code = r.ERR_DMA_FAULT
                    break
                ring.head = (ring.head + 1) % ring.len
                self.stats_regs["tx_packets"] += 1
                self.stats_regs["tx_bytes"] += length
                self.icr |= r.ICR_TX
                n += 1
        if self.error_code:
            self.icr |= r.ICR_ERROR
        return out

    def _rx_pass(self) -> None:
        for _ in range(BATCH * self.queues):
            if not self._can_rx():
                return
            got = self.switch.take(self.port, 1)
            if not got:  # handed on since the peek: the MAC moved (an announce) meanwhile
                return
            (frame,) = got
            q = self._steer(frame)
            ring = self.rx[q]
            if not ring.enabled:
                self.stats_regs["rx_no_queue"] += 1
                continue
            if len(frame) > self._buf_size():
                self.stats_regs["rx_oversize"] += 1
                continue
            addr = int(ring.posted[ring.head])
            status = len(frame) | r.RXD_DD | r.RXD_EOP | (q << 32)
            try:
                self.iommu.write(addr, frame)
                self.iommu.write(ring.desc_addr(ring.head) + 8, STATUS.pack(status))
            except DmaFault:
                self.error_code = r.ERR_DMA_FAULT
                self.icr |= r.ICR_ERROR
                return
            ring.head = (ring.head + 1) % ring.len
            self.stats_regs["rx_packets"] += 1
            self.stats_regs["rx_bytes"] += len(frame)
            self.icr |= r.ICR_RX

    def _quiesce(self, drain_tx: bool) -> None:
        """Stop taking frames and wait for the pass in flight; send what TX still holds."""
        self.switch.stand_down(self.port)
        with self._cv:
            self._accepting = False
            self._cv.notify_all()
            while self._busy:
                self._cv.wait()
            out = self._tx_pass(limit=1 << 16) if drain_tx and self.ctrl & r.CTRL_ENABLE else []
        for frame in out:
            self.switch.transmit(self.port, frame)

    # ---- migration hooks
    def on_arc(self, cur: MigState, nxt: MigState) -> None:
        if nxt in RUNNING_STATES:
            with self._cv:
                self._accepting = True
                self._cv.notify_all()
            self._own_mac()
        else:
            self._quiesce(drain_tx=cur in RUNNING_STATES)

    def _own_mac(self) -> None:
        """The VF runs here: its port owns the MAC (again, after a rollback that follows
        the destination's announce: the source's traffic comes back to it)."""
        moved = self.switch.reclaim(self.port)
        if moved or self._loaded:
            # The MAC arrived on this host: teach the network (QEMU's self-announce).
            self.switch.announce(self.port)
            self._loaded = False

    def device_reset(self) -> None:
        self._quiesce(drain_tx=False)
        with self._cv:
            self._reset_registers()
            self._mediator = RxMediator()
            self._accepting = True
            self._cv.notify_all()
        self._own_mac()  # a reset VF runs (a rollback's last resort): the VM goes on here

    def gate_output(self, gate: OutputGate) -> None:
        """The switch holds, releases or drops what this VF transmits; frames for it
        still arrive (only its output waits for the audit)."""
        if gate is OutputGate.HOLD:
            self.switch.hold(self.port)
            return
        if gate is OutputGate.RELEASE:
            figures = self.switch.release(self.port)
        else:
            figures = self.switch.drop(self.port)
        for k, v in figures.items():
            self.stats[f"output_{k}"] = v

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"mac": r.format_mac(self.mac), "vlan": self.vlan}
        cfg["queues"] = self.queues
        if self.window is not None:
            cfg["dma-window"] = list(self.window)
        return cfg

    def mediated_dirty_pages(self) -> npt.NDArray[np.int64]:
        with self._cv:  # no DMA moves a head while the mediator reads them
            return self._mediator.report(self.iommu, self.rx, self.tx, self._buf_size())

    def registers(self) -> dict[str, Any]:
        """Everything the guest or the switch can tell apart, from the shadows."""
        with self._cv:
            return {
                "ctrl": self.ctrl,
                "rx_buf_size": self.rx_buf_size,
                "icr": self.icr,
                "error_code": self.error_code,
                "stats": dict(self.stats_regs),
                "filters": {"mac": r.format_mac(self.mac), "vlan": self.vlan},
                "rx": [q.to_dict() for q in self.rx],
                "tx": [q.to_dict() for q in self.tx],
            }

    def save_initial(self) -> bytes:
        return json.dumps(self.identity.to_dict()).encode()

    def save_final(self) -> bytes:
        return json.dumps(self.registers()).encode()

    def final_estimate(self) -> int | None:
        with self._cv:
            posted = sum(q.in_flight() for q in self.rx)
        return 1024 + 256 * self.queues + 24 * posted

    def load(self, pieces: list[tuple[bytes, bytes]]) -> None:
        state: dict[str, Any] | None = None
        try:
            for kind, data in pieces:
                if kind == PIECE_INITIAL:
                    ident = DeviceIdentity.from_dict(json.loads(data))
                    why = ident.incompatibility(self.identity)
                    if why:
                        raise DeviceError(f"{self.name}: incompatible state: {why}")
                elif kind == PIECE_FINAL:
                    state = json.loads(data)
            if state is None:
                raise DeviceError(f"{self.name}: device state lacks its registers")
            if state["filters"] != {"mac": r.format_mac(self.mac), "vlan": self.vlan}:
                raise DeviceError(f"{self.name}: filters {state['filters']} differ from this VF's")
            rx = [Ring.from_dict(q) for q in state["rx"]]
            tx = [Ring.from_dict(q) for q in state["tx"]]
            stats = {k: int(state["stats"][k]) for k in r.STAT_NAMES}
            if len(rx) != self.queues or len(tx) != self.queues:
                raise DeviceError(f"{self.name}: state has {len(rx)} queues, this VF {self.queues}")
            regs = {k: int(state[k]) for k in ("ctrl", "rx_buf_size", "icr", "error_code")}
        except (ValueError, KeyError, TypeError) as e:
            raise DeviceError(f"{self.name}: device state is malformed: {e!r}") from e
        with self._cv:
            for k, v in regs.items():
                setattr(self, k, v)
            self.stats_regs, self.rx, self.tx = stats, rx, tx
            self._mediator = RxMediator()
            self._loaded = True


def _map_window(iommu: Iommu, text: str) -> tuple[int, int]:
    """Map only [START, END) of RAM (identity), as a guest behind a vIOMMU maps only its
    rings and buffers: DMA anywhere else faults, and those pages are nobody's to write."""
    start_s, sep, end_s = text.partition(":")
    why = f"vf: {DMA_WINDOW_OPTION}={text}: use START:END (page-aligned sizes, START < END)"
    try:
        start, end = parse_size(start_s), parse_size(end_s)
    except ConfigError:
        raise ConfigError(why) from None
    if not sep or start >= end or start % PAGE_SIZE or end % PAGE_SIZE:
        raise ConfigError(why)
    for m in iommu.mappings:
        iommu.unmap(m.iova, m.size)
    for region in iommu.memory.regions:
        lo, hi = max(start, region.gpa), min(end, region.gpa + region.size)
        if lo < hi:
            iommu.map(lo, hi - lo, lo)
    if not iommu.mappings:
        raise ConfigError(f"vf: {DMA_WINDOW_OPTION}={text} holds no RAM")
    return start, end
