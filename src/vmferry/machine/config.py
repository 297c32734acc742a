"""What a VM is made of: the data a destination needs to rebuild it (no live resources)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from vmferry.errors import ConfigError

MAX_VCPUS = 8
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([BKMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, default_unit: str = "B") -> int:
    """'1G', '1.5G', '512M', '4096' → bytes (binary units). A bare number is in
    ``default_unit``: "M" for a guest's RAM, as QEMU's ``-m 100`` means 100 MiB."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot read size {text!r}: use a number with K, M, G or T")
    value = Fraction(m.group(1)) * _UNITS[(m.group(2) or default_unit).upper()]
    if value.denominator != 1:
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


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

        from vmferry.devices.registry import MAX_DEVICES, DeviceSpec

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
