"""The host's SR-IOV administration as plain JSON-able answers (CLI and QMP share it)."""

from __future__ import annotations

from typing import Any

from vmferry.devices.nic.host import HostConfig


def listing(cfg: HostConfig | None = None) -> list[dict[str, Any]]:
    """One entry per PF with its VFs and which VM process holds each."""
    cfg = cfg or HostConfig()
    out = []
    for name, pf in sorted(cfg.read().pfs.items()):
        vfs = [
            {
                "index": i,
                "mac": v.mac,
                "vlan": v.vlan,
                "queues": v.queues,
                "holder": v.holder if v.holder_alive() else 0,
            }
            for i, v in enumerate(pf.vfs)
        ]
        out.append(
            {
                "pf": name,
                "numvfs": len(pf.vfs),
                "uplink": pf.uplink,
                "neighbours": pf.neighbours,
                "buffer": pf.buffer,
                "vfs": vfs,
            }
        )
    return out


def set_numvfs(pf: str, numvfs: int) -> dict[str, Any]:
    p = HostConfig().set_numvfs(pf, numvfs)
    return {"pf": pf, "numvfs": len(p.vfs), "uplink": p.uplink}


def config_vf(
    pf: str, index: int, mac: str | None = None, vlan: int | None = None, queues: int | None = None
) -> dict[str, Any]:
    v = HostConfig().config_vf(pf, index, mac=mac, vlan=vlan, queues=queues)
    return {"pf": pf, "index": index, "mac": v.mac, "vlan": v.vlan, "queues": v.queues}
