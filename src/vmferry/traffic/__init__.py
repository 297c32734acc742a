"""Traffic through a VM's NIC: the frames netecho answers, and the peer that checks them."""

from vmferry.traffic.peer import TrafficPeer, TrafficReport

__all__ = ["TrafficPeer", "TrafficReport"]
