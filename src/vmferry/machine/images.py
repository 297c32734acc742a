"""Built-in guest images by name (``memtouch``) or any multiboot ELF by path."""

from __future__ import annotations

import os
from pathlib import Path

from vmferry.errors import GuestImageError


def guest_dirs() -> list[Path]:
    """Where built images are looked for: $VMFERRY_GUESTS, then the source tree's build dir."""
    dirs = []
    if env := os.environ.get("VMFERRY_GUESTS"):
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parents[3] / "guests" / "build")
    return dirs


def resolve_image(name: str) -> Path:
    p = Path(name)
    if p.suffix or "/" in name:
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
