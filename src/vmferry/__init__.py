"""vmferry: live migration of KVM virtual machines with passthrough-style devices."""

__version__ = "0.1.0"
