"""The SR-IOV NIC: a PF's virtual functions (X710-style VF device model), the host state
that configures them, and the host switch with its UDP uplink."""

from vmferry.devices.nic.host import HostConfig, current_host, on_host
from vmferry.devices.nic.switch import HostSwitch, close_host, host_switch
from vmferry.devices.nic.vf import VirtualFunction

__all__ = [
    "HostConfig",
    "HostSwitch",
    "VirtualFunction",
    "close_host",
    "current_host",
    "host_switch",
    "on_host",
]
