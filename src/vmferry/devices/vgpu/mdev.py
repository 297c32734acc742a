"""The host's mdev registry: parent GPUs and the vGPUs created on them, by UUID.

vmferry runs one VM per process, so this host-wide state lives in a small JSON file
(``mdev.json`` in the host's state directory, :mod:`vmferry.state_dir`) under an
exclusive ``flock``: ``vmferry mdev create`` in one process and
``vmferry run --device vgpu,uuid=…`` in another agree on what exists. Like writing a
UUID to an mdev type's ``create`` file, creating reserves a VRAM share on the parent;
attaching records which processes use it. Records left by processes that died
(transient vGPUs, holders) are pruned whenever the file is opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmferry.devices.vgpu.types import (
    DEFAULT_PARENT,
    DEFAULT_PARENT_VRAM,
    MAX_VGPUS,
    PARENT_MODEL,
    TYPES,
    VgpuType,
    check_parent_vram,
    vgpu_type,
)
from vmferry.errors import ConfigError, VmferryError
from vmferry.state_dir import default_state_dir, ensure_state_dir

STATE_FILE = "mdev.json"
# A VM and its migration destination on the same host hold the same vGPU for a moment;
# only the incoming side of a migration may take the second place (``attach``).
MAX_HOLDERS = 2


class MdevError(VmferryError):
    """An mdev request the host cannot grant (limit reached, UUID in use, unknown)."""


def state_dir() -> Path:
    return default_state_dir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Instance:
    uuid: str
    type: str
    parent: str
    vram_offset: int  # placement of its share in the parent's VRAM
    transient_pid: int = 0  # created by `--device vgpu,type=…`: removed when that ends
    holders: list[int] = field(default_factory=list)  # processes using it now


@dataclass
class Parent:
    name: str
    vram: int
    model: str = PARENT_MODEL


@dataclass
class TypeInfo:
    name: str
    parent: str
    share: int
    fences: int
    weight: int
    available_instances: int
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HostState:
    parents: dict[str, Parent] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)

    # ---- accounting
    def on(self, parent: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.parent == parent]

    def free_offsets(self, parent: Parent, t: VgpuType) -> list[int]:
        """Aligned places for a share of type ``t``: shares are power-of-two fractions
        placed at multiples of their size, so they never straddle one another."""
        share = t.share(parent.vram)
        used = [(i.vram_offset, vgpu_type(i.type).share(parent.vram)) for i in self.on(parent.name)]
        return [
            off
            for off in range(0, parent.vram - share + 1, share)
            if all(off + share <= o or o + n <= off for o, n in used)
        ]

    def available(self, parent: Parent, t: VgpuType) -> int:
        return min(MAX_VGPUS - len(self.on(parent.name)), len(self.free_offsets(parent, t)))

    def type_infos(self, parent_name: str) -> list[TypeInfo]:
        p = self.parents[parent_name]
        return [
            TypeInfo(
                t.name,
                p.name,
                t.share(p.vram),
                t.fences,
                t.weight,
                self.available(p, t),
                t.describe(p.vram),
            )
            for t in TYPES.values()
        ]

    # ---- changes
    def parent(self, name: str, vram: int | None) -> Parent:
        """The parent ``name``, made with ``vram`` bytes (default 4 GiB) if new; its VRAM
        size changes only while no vGPU is on it."""
        p = self.parents.get(name)
        if p is None:
            p = Parent(name, check_parent_vram(vram or DEFAULT_PARENT_VRAM))
            self.parents[name] = p
        elif vram is not None and vram != p.vram:
            if self.on(name):
                raise MdevError(
                    f"parent {name} has {p.vram >> 20} MiB VRAM and vGPUs on it; "
                    f"it cannot become {vram >> 20} MiB"
                )
            p.vram = check_parent_vram(vram)
        return p

    def create(
        self, uuid: str, type_name: str, parent_name: str, vram: int | None, transient_pid: int = 0
    ) -> Instance:
        uuid = canonical_uuid(uuid)
        t = vgpu_type(type_name)
        if uuid in self.instances:
            raise MdevError(f"vGPU {uuid} already exists (type {self.instances[uuid].type})")
        p = self.parent(parent_name, vram)
        if len(self.on(p.name)) >= MAX_VGPUS:
            raise MdevError(f"parent {p.name} already has {MAX_VGPUS} vGPUs, the most it takes")
        free = self.free_offsets(p, t)
        if not free:
            raise MdevError(
                f"parent {p.name} has no room for a {t.name} "
                f"({t.share(p.vram) >> 20} MiB of its {p.vram >> 20} MiB VRAM): "
                "available_instances is 0"
            )
        inst = Instance(uuid, t.name, p.name, free[0], transient_pid)
        self.instances[uuid] = inst
        return inst

    def remove(self, uuid: str) -> Instance:
        inst = self.get(uuid)
        if inst.holders:
            raise MdevError(f"vGPU {inst.uuid} is in use by process {inst.holders[0]}")
        del self.instances[inst.uuid]
        return inst

    def get(self, uuid: str) -> Instance:
        u = canonical_uuid(uuid)
        if u not in self.instances:
            raise MdevError(f"no vGPU {u} on this host (create it with 'vmferry mdev create')")
        return self.instances[u]

    def prune(self) -> None:
        for inst in list(self.instances.values()):
            inst.holders = [p for p in inst.holders if _alive(p)]
            if inst.transient_pid and not _alive(inst.transient_pid):
                del self.instances[inst.uuid]

    # ---- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "parents": [asdict(p) for p in self.parents.values()],
            "instances": [asdict(i) for i in self.instances.values()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostState:
        parents = [Parent(**p) for p in d.get("parents", [])]
        insts = [Instance(**i) for i in d.get("instances", [])]
        return cls({p.name: p for p in parents}, {i.uuid: i for i in insts})


def canonical_uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise ConfigError(f"{text!r} is not a UUID") from None


@contextlib.contextmanager
def host_state(*, write: bool = True) -> Iterator[HostState]:
    """The registry, locked for the duration; written back (atomically) if ``write``."""
    d = ensure_state_dir(state_dir())
    path = d / STATE_FILE
    with open(d / "mdev.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            raw = json.loads(path.read_text()) if path.exists() else {}
            state = HostState.from_dict(raw)
        except (ValueError, TypeError) as e:
            raise MdevError(f"mdev state file {path} is corrupt: {e}") from e
        state.prune()
        if DEFAULT_PARENT not in state.parents:
            state.parents[DEFAULT_PARENT] = Parent(DEFAULT_PARENT, DEFAULT_PARENT_VRAM)
        yield state
        if write:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state.to_dict(), indent=1))
            os.replace(tmp, path)


# ---- what the CLI, QMP and the device use


def list_types(parent: str = DEFAULT_PARENT) -> list[TypeInfo]:
    with host_state() as s:
        if parent not in s.parents:
            raise MdevError(f"no parent GPU {parent!r} (known: {', '.join(sorted(s.parents))})")
        return s.type_infos(parent)


def create(
    uuid: str | None, type_name: str, parent: str = DEFAULT_PARENT, vram: int | None = None
) -> Instance:
    with host_state() as s:
        return s.create(uuid or str(uuidlib.uuid4()), type_name, parent, vram)


def remove(uuid: str) -> Instance:
    with host_state() as s:
        return s.remove(uuid)


def list_instances() -> list[Instance]:
    with host_state() as s:
        return sorted(s.instances.values(), key=lambda i: (i.parent, i.vram_offset))


def attach(
    uuid: str | None,
    type_name: str | None,
    parent: str,
    vram: int | None,
    *,
    incoming: bool = False,
) -> tuple[Instance, Parent]:
    """The vGPU a VM uses: an existing one by UUID, or a new transient one of a type.

    A vGPU in use is refused to a VM that starts, as VFIO refuses a second open of an
    mdev; ``incoming`` (the destination of a migration, which takes over the VM that
    holds it) may share it until the source lets go."""
    pid = os.getpid()
    with host_state() as s:
        if uuid is not None:
            inst = s.get(uuid)
            if type_name is not None and type_name != inst.type:
                raise MdevError(f"vGPU {inst.uuid} is a {inst.type}, not a {type_name}")
            if inst.holders and not incoming:
                raise MdevError(
                    f"vGPU {inst.uuid} is in use by process {inst.holders[0]}: a second VM "
                    "cannot attach it (only a migration of that VM can take it over)"
                )
            if len(inst.holders) >= MAX_HOLDERS:
                raise MdevError(
                    f"vGPU {inst.uuid} is in use by processes "
                    f"{', '.join(map(str, inst.holders))}: a migration to it is under way"
                )
        else:
            inst = s.create(str(uuidlib.uuid4()), type_name or "vgpu-4", parent, vram, pid)
        inst.holders.append(pid)
        return inst, s.parents[inst.parent]


def detach(uuid: str) -> None:
    pid = os.getpid()
    with host_state() as s:
        inst = s.instances.get(uuid)
        if inst is None:
            return
        if pid in inst.holders:
            inst.holders.remove(pid)
        if inst.transient_pid == pid and not inst.holders:
            del s.instances[uuid]
