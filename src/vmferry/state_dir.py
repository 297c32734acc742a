"""The host's state directory, where the vGPU and SR-IOV registries live (and their locks).

``$VMFERRY_STATE_DIR`` if set; else ``/run/vmferry`` for root; else the user's
``$XDG_RUNTIME_DIR/vmferry``; else ``/tmp/vmferry-$UID``. A directory in a world-writable
parent such as ``/tmp`` can be made in advance by anyone, so there it is used only if it
is this user's own, a real directory, and closed to everyone else (mode 0700).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from vmferry.errors import ConfigError


def default_state_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    env = os.environ if env is None else env
    uid = os.geteuid() if euid is None else euid
    if explicit := env.get("VMFERRY_STATE_DIR"):
        return Path(explicit)
    if uid == 0:
        return Path("/run/vmferry")
    if runtime := env.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "vmferry"
    return Path(tempfile.gettempdir()) / f"vmferry-{uid}"


def ensure_state_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if it is missing; refuse one in a world-writable parent
    that another user could have made or can reach."""
    path = Path(path)
    try:
        parent = os.stat(path.parent)
    except FileNotFoundError:
        parent = None
    if parent is None or not parent.st_mode & stat.S_IWOTH:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"state directory {path}: {e.strerror}") from e
        return path
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(f"state directory {path}: {e.strerror}") from e
    st = os.lstat(path)  # lstat: a symlink planted there is refused, not followed
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"state directory {path} is not a directory (a symlink?): refused")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"state directory {path} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.geteuid()}): refused; remove it or set VMFERRY_STATE_DIR"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"state directory {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be "
            f"0700 (chmod 700 {path})"
        )
    return path
