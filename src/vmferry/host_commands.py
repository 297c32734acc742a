"""The host's QMP commands: its vGPUs and SR-IOV NICs. Their state is the host's, not a
VM's, so any VM's QMP socket answers them for the host."""

from __future__ import annotations

from typing import Any

from vmferry.devices.nic import admin as nic_admin
from vmferry.devices.vgpu import qmp as vgpu_qmp


class HostCommands:
    """The host-wide commands of :class:`~vmferry.controller.VmController` (no VM state)."""

    # ---- the host's vGPUs (host-wide state: any VM's socket answers for the host)
    def x_mdev_types(self, parent: str = "gpu0") -> list[dict[str, Any]]:
        return vgpu_qmp.types(parent)

    def x_mdev_create(
        self, type: str, uuid: str | None = None, parent: str = "gpu0", vram: int | None = None
    ) -> dict[str, Any]:
        return vgpu_qmp.create(type, uuid, parent, vram)

    def x_mdev_remove(self, uuid: str) -> None:
        vgpu_qmp.remove(uuid)

    def x_mdev_list(self) -> list[dict[str, Any]]:
        return vgpu_qmp.instances()

    # ---- the host's SR-IOV NICs (host-wide state, like the vGPUs)
    def x_sriov_set_numvfs(self, pf: str, numvfs: int) -> dict[str, Any]:
        return nic_admin.set_numvfs(pf, numvfs)

    def x_sriov_config_vf(
        self,
        pf: str,
        index: int,
        mac: str | None = None,
        vlan: int | None = None,
        queues: int | None = None,
    ) -> dict[str, Any]:
        return nic_admin.config_vf(pf, index, mac, vlan, queues)

    def x_query_sriov(self) -> list[dict[str, Any]]:
        return nic_admin.listing()
