"""The exception tree: one root, organised by what went wrong."""

from __future__ import annotations


class VmferryError(Exception):
    """Root of every error vmferry raises on purpose."""


class KvmUnavailable(VmferryError):
    """KVM cannot be used here (no device, no permission, a missing capability)."""


class KvmError(VmferryError):
    """A KVM ioctl failed."""

    def __init__(self, what: str, errno_: int, detail: str = "") -> None:
        import os

        self.what = what
        self.errno = errno_
        msg = f"{what} failed: {os.strerror(errno_)} (errno {errno_})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class GuestImageError(VmferryError):
    """A guest image cannot be booted (not ELF, no multiboot header, does not fit)."""


class GuestError(VmferryError):
    """The guest did something the VMM cannot continue from (triple fault, bad I/O)."""


class MachineStateError(VmferryError):
    """An operation asked of a machine or vCPU in a state that does not allow it."""


class StreamError(VmferryError):
    """A saved-state or migration stream is corrupt, truncated or of another version."""


class ConfigError(VmferryError):
    """A parameter given by the user is wrong."""


class MigrationError(VmferryError):
    """A migration failed; the source VM keeps running."""


class MigrationCancelled(MigrationError):
    """The user cancelled the migration (migrate_cancel)."""
