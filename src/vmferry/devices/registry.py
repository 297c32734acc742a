"""Device models by name, device specs from the command line, and where devices live."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vmferry.devices.base import DMA_LOG_PAGE_OPTION, INCOMING_OPTION, DeviceModel
from vmferry.devices.dmaengine import DmaEngine
from vmferry.devices.fsm import MigState
from vmferry.devices.iommu import DirtyTracking, Iommu
from vmferry.devices.nic.vf import VirtualFunction
from vmferry.devices.vgpu.device import Vgpu
from vmferry.errors import ConfigError
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory
from vmferry.sizes import parse_size


class DeviceSlots(Protocol):
    """What the registry needs of a machine's configuration (a MachineConfig): the
    device specs, one per slot. A protocol, because the machine layer sits above this."""

    @property
    def devices(self) -> Sequence[str]: ...


MODELS: dict[str, type[DeviceModel]] = {
    DmaEngine.model: DmaEngine,
    VirtualFunction.model: VirtualFunction,
    Vgpu.model: Vgpu,
}
MMIO_BASE = 0xFEB00000  # device slot i at MMIO_BASE + i * MMIO_STRIDE, in the 3–4 GiB hole
MMIO_STRIDE = 0x1000
MAX_DEVICES = 8
# dirty: DMA dirty tracking mode. x-…: for tests — report another model version, fail
# one FSM arc, block migration, or log DMA in coarser pages (dirty=device).
COMMON_OPTIONS = {"dirty", "x-version", "x-fail-arc", "x-migratable", DMA_LOG_PAGE_OPTION}


@dataclass(frozen=True)
class DeviceSpec:
    """``MODEL[,key=value…]`` as given to ``--device``."""

    model: str
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        model, *rest = text.split(",")
        if model not in MODELS:
            raise ConfigError(
                f"--device {text}: unknown device model {model!r} "
                f"(known: {', '.join(sorted(MODELS))})"
            )
        options: dict[str, str] = {}
        for item in rest:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"--device {text}: option {item!r} is not key=value")
            known = COMMON_OPTIONS | MODELS[model].model_options
            if key not in known:
                raise ConfigError(
                    f"--device {text}: unknown option {key!r} (known: {', '.join(sorted(known))})"
                )
            options[key] = value
        mode = options.get("dirty", "iommu")
        modes = sorted(m.value for m in MODELS[model].tracking_modes)
        if mode not in modes:
            raise ConfigError(f"--device {text}: dirty={mode}: {model} supports {', '.join(modes)}")
        if DMA_LOG_PAGE_OPTION in options:
            page = parse_size(options[DMA_LOG_PAGE_OPTION])
            if page < PAGE_SIZE or page & (page - 1):
                raise ConfigError(
                    f"--device {text}: {DMA_LOG_PAGE_OPTION}: a power of 2 of at least 4K"
                )
        return cls(model, options)

    def __str__(self) -> str:
        return ",".join([self.model, *(f"{k}={v}" for k, v in self.options.items())])

    @property
    def tracking(self) -> DirtyTracking:
        return DirtyTracking(self.options.get("dirty", "iommu"))


def create_device(
    spec: DeviceSpec,
    index: int,
    memory: GuestMemory,
    version: int | None = None,
    *,
    incoming: bool = False,
) -> DeviceModel:
    """``version``: report another model version (``--x-device-version``: to try what a
    destination with another device model does). ``incoming``: the device takes over a
    migrating VM's (see INCOMING_OPTION)."""
    iommu = Iommu(memory, spec.tracking)
    options = dict(spec.options)
    if version is not None:
        options["x-version"] = str(version)
    if incoming:
        options[INCOMING_OPTION] = "on"
    dev = MODELS[spec.model](f"{spec.model}{index}", iommu, options)
    if "x-fail-arc" in spec.options:
        a, _, b = spec.options["x-fail-arc"].partition(">")
        try:
            dev.fail_arcs.add((MigState[a], MigState[b]))
        except KeyError:
            raise ConfigError(
                f"x-fail-arc={spec.options['x-fail-arc']}: use FROM>TO state "
                "names, e.g. RUNNING_P2P>STOP"
            ) from None
    return dev


def mmio_base(index: int) -> int:
    return MMIO_BASE + index * MMIO_STRIDE


def create_devices(
    config: DeviceSlots,
    memory: GuestMemory,
    versions: dict[str, int] | None = None,
    *,
    incoming: bool = False,
) -> list[DeviceModel]:
    devices: list[DeviceModel] = []
    try:
        for i, text in enumerate(config.devices):
            spec = DeviceSpec.parse(text)
            version = (versions or {}).get(spec.model)
            devices.append(create_device(spec, i, memory, version, incoming=incoming))
    except BaseException:
        for d in devices:
            d.close()
        raise
    return devices
