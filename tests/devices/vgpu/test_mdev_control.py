"""`vmferry mdev …` in separate processes sharing the host registry, and the x-mdev QMP
commands (schema and what they answer)."""

from __future__ import annotations

import json
import threading
from typing import Any, cast

import pytest

from tests.conftest import vmferry
from vmferry.devices.vgpu import qmp as vgpu_qmp
from vmferry.devices.vgpu.mdev import MdevError
from vmferry.qmp.backend import QmpBackend, QmpError
from vmferry.qmp.protocol import QmpSession
from vmferry.qmp.schema import COMMANDS


def test_the_cli_creates_lists_and_removes_across_processes() -> None:
    r = vmferry("mdev", "create", "vgpu-8", "--vram", "1G")
    assert r.returncode == 0, r.stderr
    uuid = r.stdout.decode().strip()
    listed = json.loads(vmferry("mdev", "list", "--json").stdout)
    assert [(i["uuid"], i["type"], i["in-use-by"]) for i in listed] == [(uuid, "vgpu-8", [])]
    types = json.loads(vmferry("mdev", "types", "--json").stdout)
    assert {t["name"]: t["available_instances"] for t in types}["vgpu-8"] == 7
    again = vmferry("mdev", "create", "vgpu-8", "--uuid", uuid)
    assert again.returncode == 125 and f"vGPU {uuid} already exists" in again.stderr
    assert vmferry("mdev", "remove", uuid).returncode == 0
    assert json.loads(vmferry("mdev", "list", "--json").stdout) == []
    gone = vmferry("mdev", "remove", uuid)
    assert gone.returncode == 125 and "no vGPU" in gone.stderr


def test_qmp_mdev_commands() -> None:
    args = COMMANDS["x-mdev-create"].check_arguments({"type": "vgpu-4", "vram": 1 << 30})
    made = vgpu_qmp.create(**{k.replace("-", "_"): v for k, v in args.items()})
    assert made["type"] == "vgpu-4" and made["in-use-by"] == []
    avail = {t["name"]: t["available-instances"] for t in vgpu_qmp.types()}
    assert avail == {"vgpu-1": 0, "vgpu-2": 1, "vgpu-4": 3, "vgpu-8": 6}
    assert [i["uuid"] for i in vgpu_qmp.instances()] == [made["uuid"]]
    with pytest.raises(MdevError, match="already exists"):
        vgpu_qmp.create("vgpu-4", made["uuid"])
    vgpu_qmp.remove(made["uuid"])
    with pytest.raises(MdevError, match="no vGPU"):
        vgpu_qmp.remove(made["uuid"])
    with pytest.raises(QmpError, match="does not accept value"):
        COMMANDS["x-mdev-create"].check_arguments({"type": "vgpu-3"})


class _MdevOnly:
    """A QMP backend with only the mdev commands, as the controller answers them."""

    def x_mdev_remove(self, uuid: str) -> None:
        vgpu_qmp.remove(uuid)


def test_a_registry_refusal_becomes_a_generic_error_at_the_qmp_boundary() -> None:
    """The device layer raises its own error; the QMP session turns it into the reply."""
    session = QmpSession(cast(QmpBackend, _MdevOnly()), threading.Lock())
    session.handle(b'{"execute": "qmp_capabilities"}')
    uuid = "6c0a4b0e-0000-4000-8000-000000000001"
    text = json.dumps({"execute": "x-mdev-remove", "arguments": {"uuid": uuid}, "id": 7})
    reply: dict[str, Any] = session.handle(text.encode())
    assert reply["id"] == 7
    assert reply["error"]["class"] == "GenericError"
    assert "no vGPU" in reply["error"]["desc"] and uuid in reply["error"]["desc"]
