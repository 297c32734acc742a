"""Host-wide SR-IOV state: the PFs, how many VFs each has, each VF's MAC, VLAN and queues,
and which VM process holds each VF.

vmferry runs one VM per process, so what a PF driver keeps in the kernel lives here in a
small JSON file under the host's state directory (:mod:`vmferry.state_dir`), changed
under an exclusive ``flock`` so that ``vmferry sriov …`` and every
``vmferry run --device vf,…`` agree.
Tests that put two "hosts" in one process give each its own directory and say which one
is current with :func:`on_host`.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmferry.devices.nic.regs import MAX_QUEUES, MAX_VFS, format_mac, parse_mac
from vmferry.errors import ConfigError
from vmferry.state_dir import default_state_dir, ensure_state_dir

STATE_FILE, LOCK_FILE = "sriov.json", "sriov.lock"
STATE_VERSION = 1
DEFAULT_UPLINK = "127.0.0.1:4790"
DEFAULT_BUFFER = 4096  # frames a switch port holds while its VF cannot take them

_current: contextvars.ContextVar[Path | None] = contextvars.ContextVar("vmferry_host", default=None)


def current_host() -> Path:
    """The state directory of the host this code runs on."""
    return _current.get() or default_state_dir()


@contextlib.contextmanager
def on_host(state_dir: Path) -> Iterator[Path]:
    """Run the block as if on the host whose state lives in ``state_dir`` (tests, bench)."""
    token = _current.set(Path(state_dir))
    try:
        yield Path(state_dir)
    finally:
        _current.reset(token)


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        if not sep or not host:
            raise ValueError
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"address {text!r} is not HOST:PORT") from None
    return host, p


def default_mac(pf: str, index: int) -> str:
    """A locally administered MAC that depends only on the PF name and VF index, so two
    hosts configured alike give a VF the same MAC (which a migration requires)."""
    h = zlib.crc32(pf.encode())
    return format_mac(bytes([0x02, 0x56, (h >> 8) & 0xFF, h & 0xFF, 0x00, index]))


@dataclass
class VfConfig:
    mac: str
    vlan: int = 0
    queues: int = 1
    holder: int = 0  # pid of the VM process using it, 0 if free

    def holder_alive(self) -> bool:
        if not self.holder:
            return False
        try:
            os.kill(self.holder, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@dataclass
class PfConfig:
    uplink: str = DEFAULT_UPLINK
    neighbours: list[str] = field(default_factory=list)  # other hosts' switches, peers
    buffer: int = DEFAULT_BUFFER
    vfs: list[VfConfig] = field(default_factory=list)


@dataclass
class HostState:
    pfs: dict[str, PfConfig] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "pfs": {k: asdict(v) for k, v in self.pfs.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path) -> HostState:
        if d.get("version") != STATE_VERSION:
            raise ConfigError(f"{where}: state version {d.get('version')!r}, {STATE_VERSION} known")
        try:
            pfs = {
                name: PfConfig(
                    uplink=str(p["uplink"]),
                    neighbours=[str(n) for n in p.get("neighbours", [])],
                    buffer=int(p.get("buffer", DEFAULT_BUFFER)),
                    vfs=[VfConfig(**v) for v in p.get("vfs", [])],
                )
                for name, p in d["pfs"].items()
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: SR-IOV state is malformed: {e!r}") from e
        return cls(pfs)

    def pf(self, name: str) -> PfConfig:
        if name not in self.pfs:
            known = ", ".join(sorted(self.pfs)) or "none"
            raise ConfigError(f"no physical function {name!r} on this host (have: {known})")
        return self.pfs[name]

    def vf(self, pf: str, index: int) -> VfConfig:
        p = self.pf(pf)
        if not 0 <= index < len(p.vfs):
            raise ConfigError(f"{pf} has {len(p.vfs)} VFs: there is no VF {index}")
        return p.vfs[index]


class HostConfig:
    """The state file of one host, read and changed under its lock."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.dir = Path(state_dir) if state_dir is not None else current_host()

    @contextlib.contextmanager
    def locked(self) -> Iterator[HostState]:
        """The state, for changing: written back when the block ends without an error."""
        ensure_state_dir(self.dir)
        with open(self.dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            yield state
            tmp = self.dir / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state.to_dict(), indent=2) + "\n")
            os.replace(tmp, self.dir / STATE_FILE)

    def read(self) -> HostState:
        ensure_state_dir(self.dir)
        with open(self.dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            return self._read()

    def _read(self) -> HostState:
        path = self.dir / STATE_FILE
        if not path.exists():
            return HostState()
        try:
            return HostState.from_dict(json.loads(path.read_text()), path)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e

    # ---- what `vmferry sriov` does
    def set_numvfs(
        self,
        pf: str,
        numvfs: int,
        *,
        uplink: str | None = None,
        neighbours: list[str] | None = None,
        buffer: int | None = None,
    ) -> PfConfig:
        """sriov_numvfs: like the kernel, a PF with VFs must go back to 0 before it gets
        another count, and VFs in use cannot be removed. 0 removes the PF's entry."""
        if not 0 <= numvfs <= MAX_VFS:
            raise ConfigError(f"{pf}: sriov_numvfs {numvfs} is outside 0..{MAX_VFS}")
        if uplink is not None:
            parse_addr(uplink)
        for n in neighbours or []:
            parse_addr(n)
        if buffer is not None and not 1 <= buffer <= 1 << 20:
            raise ConfigError(f"{pf}: switch buffer {buffer} frames is outside 1..{1 << 20}")
        with self.locked() as st:
            p = st.pfs.setdefault(pf, PfConfig())
            if p.vfs and numvfs and numvfs != len(p.vfs):
                raise ConfigError(
                    f"{pf} has {len(p.vfs)} VFs: set sriov_numvfs to 0 before changing it "
                    "(the kernel answers EBUSY too)"
                )
            busy = [i for i, v in enumerate(p.vfs) if v.holder_alive()]
            if busy and numvfs == 0:
                raise ConfigError(f"{pf}: VFs {busy} are in use by running VMs")
            if numvfs == 0:
                # A PF with no VFs has nothing left to keep: it leaves the state file (and
                # `sriov list`); a later set-numvfs starts it afresh.
                p.vfs = []
                del st.pfs[pf]
            elif not p.vfs:
                p.vfs = [VfConfig(default_mac(pf, i)) for i in range(numvfs)]
            if uplink is not None:
                p.uplink = uplink
            if neighbours is not None:
                p.neighbours = list(neighbours)
            if buffer is not None:
                p.buffer = buffer
            return p

    def config_vf(
        self,
        pf: str,
        index: int,
        *,
        mac: str | None = None,
        vlan: int | None = None,
        queues: int | None = None,
    ) -> VfConfig:
        """``ip link set PF vf N mac … vlan …``: only while no VM holds the VF."""
        with self.locked() as st:
            v = st.vf(pf, index)
            if v.holder_alive():
                raise ConfigError(f"{pf} VF {index} is in use by process {v.holder}")
            if mac is not None:
                try:
                    mac = format_mac(parse_mac(mac))
                except ValueError as e:
                    raise ConfigError(f"{pf} VF {index}: {e}") from e
                others = [
                    (n, i)
                    for n, p in st.pfs.items()
                    for i, o in enumerate(p.vfs)
                    if o.mac == mac and (n, i) != (pf, index)
                ]
                if others:
                    raise ConfigError(f"MAC {mac} is already {others[0][0]} VF {others[0][1]}'s")
                v.mac = mac
            if vlan is not None:
                if not 0 <= vlan <= 4094:
                    raise ConfigError(f"{pf} VF {index}: VLAN {vlan} is outside 0..4094")
                v.vlan = vlan
            if queues is not None:
                if not 1 <= queues <= MAX_QUEUES:
                    raise ConfigError(f"{pf} VF {index}: {queues} queues, 1..{MAX_QUEUES} allowed")
                v.queues = queues
            return v

    def claim(self, pf: str, index: int, pid: int) -> tuple[PfConfig, VfConfig]:
        """Attach a VF to the VM in process ``pid``; one VM per VF."""
        with self.locked() as st:
            v = st.vf(pf, index)
            if v.holder_alive() and v.holder != pid:
                raise ConfigError(
                    f"{pf} VF {index} is in use by process {v.holder} (a migration between "
                    "two processes on one machine needs two host state directories)"
                )
            v.holder = pid
            return st.pfs[pf], v

    def release(self, pf: str, index: int, pid: int) -> None:
        with contextlib.suppress(ConfigError), self.locked() as st:
            v = st.vf(pf, index)
            if v.holder == pid:
                v.holder = 0
