"""Built-in guest images by name (``memtouch``) or any multiboot ELF by path."""

from __future__ import annotations

import os
from pathlib import Path

from vmferry.errors import ConfigError, GuestImageError

#: Keys the guest runtime reads for every image (guests/rt/rt.c).
RUNTIME_KEYS = frozenset({"vcpus", "tsc_khz"})
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


def check_guest_args(image: str, cmdline: str) -> None:
    """Refuse KEY=VALUE words a built-in image would silently ignore (a typo'd key runs
    the guest with its default). A path to an ELF is not checked: its keys are unknown."""
    keys = GUEST_KEYS.get(image) if _is_builtin_name(image) else None
    if keys is None:
        return
    known = keys | RUNTIME_KEYS
    for word in cmdline.split():
        key, eq, _ = word.partition("=")
        if not eq or not key:
            raise ConfigError(f"guest argument {word!r}: {image} takes KEY=VALUE arguments")
        if key not in known:
            raise ConfigError(
                f"guest argument {word!r}: {image} has no key {key!r} "
                f"(it takes {', '.join(sorted(known))})"
            )


def _is_builtin_name(name: str) -> bool:
    return not (Path(name).suffix or "/" in name)
