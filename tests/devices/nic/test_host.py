"""PF/VF configuration: sriov_numvfs limits, MAC/VLAN/queue settings, VFs in use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmferry.devices.nic import HostConfig
from vmferry.devices.nic.host import default_mac
from vmferry.errors import ConfigError


def test_numvfs_is_limited_to_16_and_goes_through_zero(tmp_path: Path) -> None:
    cfg = HostConfig(tmp_path)
    with pytest.raises(ConfigError, match=r"outside 0\.\.16"):
        cfg.set_numvfs("pf0", 17)
    assert len(cfg.set_numvfs("pf0", 16).vfs) == 16
    with pytest.raises(ConfigError, match="set sriov_numvfs to 0"):
        cfg.set_numvfs("pf0", 4)
    cfg.set_numvfs("pf0", 0)
    assert len(cfg.set_numvfs("pf0", 4).vfs) == 4
    macs = [v.mac for v in cfg.read().pf("pf0").vfs]
    assert len(set(macs)) == 4 and macs[2] == default_mac("pf0", 2)


def test_vf_configuration_is_checked_and_persisted(tmp_path: Path) -> None:
    cfg = HostConfig(tmp_path)
    cfg.set_numvfs("pf0", 2)
    cfg.config_vf("pf0", 1, mac="02:AA:bb:cc:dd:01", vlan=100, queues=4)
    v = HostConfig(tmp_path).read().vf("pf0", 1)
    assert (v.mac, v.vlan, v.queues) == ("02:aa:bb:cc:dd:01", 100, 4)
    for kwargs, why in (
        ({"mac": "01:00:5e:00:00:01"}, "multicast"),
        ({"mac": "02:aa:bb"}, "six hex bytes"),
        ({"mac": "02:aa:bb:cc:dd:01"}, "already pf0 VF 1"),
        ({"vlan": 4095}, r"outside 0\.\.4094"),
        ({"queues": 5}, r"1\.\.4 allowed"),
    ):
        with pytest.raises(ConfigError, match=why):
            cfg.config_vf("pf0", 0, **kwargs)
    with pytest.raises(ConfigError, match="there is no VF 2"):
        cfg.config_vf("pf0", 2, vlan=1)
    with pytest.raises(ConfigError, match="no physical function 'pf9'"):
        cfg.config_vf("pf9", 0, vlan=1)


def test_a_vf_held_by_a_live_vm_cannot_be_changed_or_taken(tmp_path: Path) -> None:
    cfg = HostConfig(tmp_path)
    cfg.set_numvfs("pf0", 1)
    cfg.claim("pf0", 0, 1)  # pid 1 is alive: another VM holds the VF
    with pytest.raises(ConfigError, match="in use by process 1"):
        cfg.config_vf("pf0", 0, vlan=5)
    with pytest.raises(ConfigError, match="in use by process 1"):
        cfg.claim("pf0", 0, os.getpid())
    with pytest.raises(ConfigError, match="in use by running VMs"):
        cfg.set_numvfs("pf0", 0)
    cfg.release("pf0", 0, 1)
    cfg.claim("pf0", 0, os.getpid())


def test_a_corrupt_state_file_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "sriov.json").write_text("{nope")
    with pytest.raises(ConfigError, match=r"sriov\.json: not valid JSON"):
        HostConfig(tmp_path).read()
