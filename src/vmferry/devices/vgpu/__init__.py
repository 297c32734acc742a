"""A mediated vGPU in the style of Intel GVT-g: the parent GPU and its types, the host's
mdev registry, the shadow GGTT, the command scanner, the scheduler and engine, and the
migratable device model with VRAM pre-copy (docs/devices/vgpu.md)."""

from vmferry.devices.vgpu.device import Vgpu, VgpuStopCopyOnly
from vmferry.devices.vgpu.mdev import MdevError
from vmferry.devices.vgpu.types import TYPES, VgpuType

__all__ = ["TYPES", "MdevError", "Vgpu", "VgpuStopCopyOnly", "VgpuType"]
