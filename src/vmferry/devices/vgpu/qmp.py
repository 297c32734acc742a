"""The mdev QMP commands (vmferry's own, x- prefixed) over the host registry: what a
VM's control socket answers for ``x-mdev-types``, ``x-mdev-create``, ``x-mdev-remove``
and ``x-mdev-list``, as JSON values. Registry refusals stay device-layer errors
(MdevError, ConfigError); the QMP layer turns them into replies carrying their text."""

from __future__ import annotations

from typing import Any

from vmferry.devices.vgpu import mdev
from vmferry.devices.vgpu.types import DEFAULT_PARENT


def instance_json(i: mdev.Instance) -> dict[str, Any]:
    return {
        "uuid": i.uuid,
        "type": i.type,
        "parent": i.parent,
        "vram-offset": i.vram_offset,
        "in-use-by": list(i.holders),
        "transient": bool(i.transient_pid),
    }


def types(parent: str = DEFAULT_PARENT) -> list[dict[str, Any]]:
    infos = mdev.list_types(parent)
    return [
        {
            "name": t.name,
            "parent": t.parent,
            "vram-share": t.share,
            "fences": t.fences,
            "weight": t.weight,
            "available-instances": t.available_instances,
            "description": t.description,
        }
        for t in infos
    ]


def create(
    type: str, uuid: str | None = None, parent: str = DEFAULT_PARENT, vram: int | None = None
) -> dict[str, Any]:
    return instance_json(mdev.create(uuid, type, parent, vram))


def remove(uuid: str) -> None:
    mdev.remove(uuid)


def instances() -> list[dict[str, Any]]:
    return [instance_json(i) for i in mdev.list_instances()]
