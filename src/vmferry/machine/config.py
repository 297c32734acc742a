"""What a VM is made of: the data a destination needs to rebuild it (no live resources)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The device registry sits below the machine: it knows device models, not machines.
from vmferry.devices.registry import MAX_DEVICES, DeviceSpec
from vmferry.errors import ConfigError
from vmferry.sizes import parse_size

MAX_VCPUS = 8


@dataclass(frozen=True)
class MachineConfig:
    memory: int
    vcpus: int = 1
    image: str = ""
    cmdline: str = ""
    devices: tuple[str, ...] = ()  # device specs, "MODEL[,key=value…]", one per slot

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--vcpus {self.vcpus}: vmferry runs 1 to {MAX_VCPUS} vCPUs")
        if self.memory < (16 << 20) or self.memory % (2 << 20):
            shown = f"{self.memory >> 20} MiB" if self.memory % (1 << 20) == 0 else self.memory
            raise ConfigError(f"--memory {shown}: must be at least 16 MiB and a multiple of 2 MiB")
        if len(self.devices) > MAX_DEVICES:
            raise ConfigError(f"at most {MAX_DEVICES} devices")
        for spec in self.devices:
            DeviceSpec.parse(spec)  # refuses unknown models and options now

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineConfig:
        try:
            return cls(
                memory=int(d["memory"]),
                vcpus=int(d["vcpus"]),
                image=str(d["image"]),
                cmdline=str(d["cmdline"]),
                devices=tuple(str(s) for s in d.get("devices", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"machine config is incomplete or malformed: {e!r}") from e


# parse_size is read here by older callers (the CLI, tests); it lives in vmferry.sizes.
__all__ = ["MAX_VCPUS", "MachineConfig", "parse_size"]
