"""An in-memory QmpBackend: a VM that is only state, and remembers what it was asked."""

from __future__ import annotations

from typing import Any

from vmferry.qmp import QmpError
from vmferry.qmp.schema import MIGRATION_CAPABILITIES


class FakeVm:
    """Implements every QmpBackend method; `calls` records (method, arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.running = True
        self.migration: dict[str, Any] = {}
        self.parameters: dict[str, Any] = {
            "downtime-limit": 300,
            "max-bandwidth": 0,
            "multifd-channels": 2,
            "multifd-compression": "none",
            "cpu-throttle-initial": 20,
            "cpu-throttle-increment": 10,
            "max-cpu-throttle": 99,
            "x-switchover-timeout": 0,
            "x-switchover-policy": "keep-going",
            "x-peer-timeout": 5000,
            "x-verify": "on",
            "x-postcopy-after": "",
        }
        self.capabilities = dict.fromkeys(MIGRATION_CAPABILITIES, False)

    def query_status(self) -> dict[str, Any]:
        self.calls.append(("query_status", {}))
        return {"running": self.running, "status": "running" if self.running else "paused"}

    def stop(self) -> None:
        self.calls.append(("stop", {}))
        self.running = False

    def cont(self) -> None:
        self.calls.append(("cont", {}))
        self.running = True

    def quit(self) -> None:
        self.calls.append(("quit", {}))

    def migrate(self, uri: str, detach: bool = True, resume: bool = False) -> None:
        self.calls.append(("migrate", {"uri": uri, "detach": detach, "resume": resume}))
        if uri.startswith("refused:"):
            raise QmpError("migration refused by the fake", "DeviceNotActive")
        self.migration = {"status": "active"}

    def migrate_start_postcopy(self) -> None:
        self.calls.append(("migrate_start_postcopy", {}))

    def migrate_pause(self) -> None:
        self.calls.append(("migrate_pause", {}))

    def migrate_recover(self, uri: str) -> None:
        self.calls.append(("migrate_recover", {"uri": uri}))

    def migrate_incoming(self, uri: str) -> None:
        self.calls.append(("migrate_incoming", {"uri": uri}))
        if uri == "crash:":
            raise RuntimeError("the fake backend broke")

    def migrate_cancel(self) -> None:
        self.calls.append(("migrate_cancel", {}))
        self.migration = {"status": "cancelled"}

    def query_migrate(self) -> dict[str, Any]:
        self.calls.append(("query_migrate", {}))
        return dict(self.migration)

    def migrate_set_parameters(self, params: dict[str, Any]) -> None:
        self.calls.append(("migrate_set_parameters", {"params": params}))
        self.parameters.update(params)

    def query_migrate_parameters(self) -> dict[str, Any]:
        self.calls.append(("query_migrate_parameters", {}))
        return dict(self.parameters)

    def migrate_set_capabilities(self, caps: dict[str, bool]) -> None:
        self.calls.append(("migrate_set_capabilities", {"caps": caps}))
        self.capabilities.update(caps)

    def query_migrate_capabilities(self) -> dict[str, bool]:
        self.calls.append(("query_migrate_capabilities", {}))
        return dict(self.capabilities)

    def x_query_migrate_report(self) -> dict[str, Any]:
        self.calls.append(("x_query_migrate_report", {}))
        return {"status": "none"}

    def human_monitor_command(self, command_line: str, cpu_index: int | None = None) -> str:
        self.calls.append(
            ("human_monitor_command", {"command_line": command_line, "cpu_index": cpu_index})
        )
        return "VM status: running\r\n"

    def x_mdev_types(self, parent: str = "gpu0") -> list[dict[str, Any]]:
        self.calls.append(("x_mdev_types", {"parent": parent}))
        return [{"name": "vgpu-4", "parent": parent, "available-instances": 4}]

    def x_mdev_create(
        self, type: str, uuid: str | None = None, parent: str = "gpu0", vram: int | None = None
    ) -> dict[str, Any]:
        self.calls.append(("x_mdev_create", {"type": type, "uuid": uuid, "parent": parent}))
        return {"uuid": uuid or "00000000-0000-0000-0000-000000000001", "type": type}

    def x_mdev_remove(self, uuid: str) -> None:
        self.calls.append(("x_mdev_remove", {"uuid": uuid}))

    def x_mdev_list(self) -> list[dict[str, Any]]:
        self.calls.append(("x_mdev_list", {}))
        return []

    def x_sriov_set_numvfs(self, pf: str, numvfs: int) -> dict[str, Any]:
        self.calls.append(("x_sriov_set_numvfs", {"pf": pf, "numvfs": numvfs}))
        return {"pf": pf, "numvfs": numvfs, "uplink": "127.0.0.1:4790"}

    def x_sriov_config_vf(
        self,
        pf: str,
        index: int,
        mac: str | None = None,
        vlan: int | None = None,
        queues: int | None = None,
    ) -> dict[str, Any]:
        self.calls.append(("x_sriov_config_vf", {"pf": pf, "index": index, "vlan": vlan}))
        return {"pf": pf, "index": index, "mac": mac or "02:56:00:00:00:00", "vlan": vlan or 0}

    def x_query_sriov(self) -> list[dict[str, Any]]:
        self.calls.append(("x_query_sriov", {}))
        return []
