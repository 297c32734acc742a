"""Built-in guest images by name (``memtouch``) or any multiboot ELF by path."""

from __future__ import annotations

import os
from pathlib import Path

from vmferry.errors import ConfigError, GuestImageError

#: Keys the guest runtime reads for every image (guests/rt/rt.c). They are for QEMU's
#: multiboot loader, which tells the guest neither; vmferry tells it both in CPUID (from
#: --vcpus and the host's TSC), and a vcpus= on the command line would override that: more
#: than the VM has and the guest waits for ever for vCPUs that never start.
RUNTIME_KEYS = frozenset({"vcpus", "tsc_khz"})
_SET_BY_VMFERRY = {
    "vcpus": "vcpus= is set by vmferry from --vcpus",
    "tsc_khz": "tsc_khz= is set by vmferry from the host's TSC frequency",
}
#: The keys each built-in image reads from its command line (its cmd_get_* calls), besides
#: the runtime's. None: the image takes any text (hello prints its command line back).
GUEST_KEYS: dict[str, frozenset[str] | None] = {
    "hello": None,
    "memtouch": frozenset({"wss", "pattern", "seed", "rate", "rounds"}),
    "cpustate": frozenset({"park"}),
    "dmatest": frozenset({"seed", "rounds", "bufs", "bufsize", "depth", "rate", "dev", "timeout"}),
    "gpujob": frozenset({"seed", "rounds", "ws", "block", "dim", "rate", "dev", "timeout"}),
    "netecho": frozenset({"dev", "ring", "bufsize", "frames", "idle"}),
    "fault": frozenset({"vcpu"}),
    "churn": frozenset({"wss", "seed", "report", "rounds"}),
}


def guest_dirs() -> list[Path]:
    """Where built images are looked for: $VMFERRY_GUESTS, then the source tree's build dir."""
    dirs = []
    if env := os.environ.get("VMFERRY_GUESTS"):
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parents[3] / "guests" / "build")
    return dirs


def resolve_image(name: str) -> Path:
    p = Path(name)
    if not _is_builtin_name(name):
        if not p.is_file():
            raise GuestImageError(f"guest image {name} does not exist")
        return p
    for d in guest_dirs():
        cand = d / f"{name}.elf"
        if cand.is_file():
            return cand
    raise GuestImageError(
        f"no built-in guest image {name!r} in {', '.join(map(str, guest_dirs()))}; "
        "build them with 'make guests'"
    )


def check_guest_args(image: str, cmdline: str, vcpus: int = 1) -> None:
    """Refuse KEY=VALUE words a built-in image would silently ignore (a typo'd key runs
    the guest with its default), the runtime's keys that vmferry sets itself, and a
    ``fault`` vCPU the VM does not have. A path to an ELF is not checked: its keys are
    unknown."""
    if not _is_builtin_name(image) or image not in GUEST_KEYS:
        return
    keys = GUEST_KEYS[image]
    for word in cmdline.split():
        key, eq, value = word.partition("=")
        if key in _SET_BY_VMFERRY and eq:
            raise ConfigError(f"guest argument {word!r}: {_SET_BY_VMFERRY[key]}")
        if keys is None:
            continue  # hello takes any text
        if not eq or not key:
            raise ConfigError(f"guest argument {word!r}: {image} takes KEY=VALUE arguments")
        if key not in keys:
            raise ConfigError(
                f"guest argument {word!r}: {image} has no key {key!r} "
                f"(it takes {', '.join(sorted(keys))})"
            )
        if image == "fault" and key == "vcpu" and not (value.isdigit() and int(value) < vcpus):
            # The guest reads a non-number as 0 and takes the number modulo the vCPU count:
            # either way another vCPU than the one asked for would fault.
            raise ConfigError(
                f"guest argument {word!r}: vcpu must be a vCPU number, 0 to {vcpus - 1} "
                f"(--vcpus {vcpus})"
            )


def _is_builtin_name(name: str) -> bool:
    return not (Path(name).suffix or "/" in name)
