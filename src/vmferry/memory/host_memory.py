"""How much memory this host can give a guest: checked before a VM is built, so a size the
host cannot back is refused at once rather than found out by the OOM killer (or a
pre-allocation that spins for a minute)."""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.errors import ConfigError

MEMINFO = "/proc/meminfo"


@dataclass(frozen=True)
class HostMemory:
    """/proc/meminfo's figures, in bytes."""

    ram: int  # MemTotal
    swap: int  # SwapTotal
    available: int  # MemAvailable + SwapFree: what can be allocated now

    @property
    def total(self) -> int:
        """The most guest pages this host can ever hold at once (RAM and swap)."""
        return self.ram + self.swap

    @classmethod
    def parse(cls, text: str, where: str = MEMINFO) -> HostMemory:
        fields: dict[str, int] = {}
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            words = rest.split()
            if words and words[0].isdigit():
                scale = 1024 if words[1:] == ["kB"] else 1
                fields[name.strip()] = int(words[0]) * scale
        try:
            return cls(
                ram=fields["MemTotal"],
                swap=fields.get("SwapTotal", 0),
                available=fields["MemAvailable"] + fields.get("SwapFree", 0),
            )
        except KeyError as e:
            raise ConfigError(f"{where} has no {e.args[0]} line") from None

    @classmethod
    def read(cls, path: str = MEMINFO) -> HostMemory:
        try:
            with open(path) as f:
                return cls.parse(f.read(), path)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_guest_ram(size: int, host: HostMemory, *, overcommit: bool) -> None:
    """Guest RAM is a sparse memfd (a page takes memory when first touched), so a guest may
    be larger than what is free now; but one larger than RAM and swap together can never
    be backed whole, and is run only when the user says so (``--overcommit``)."""
    if size > host.total and not overcommit:
        raise ConfigError(
            f"--memory {_gib(size)}: this host has {_gib(host.ram)} of RAM and "
            f"{_gib(host.swap)} of swap, so it can never back the whole guest "
            "(--overcommit runs it anyway, as long as the guest touches less)"
        )


def check_prealloc(size: int, host: HostMemory) -> None:
    """Pre-allocation touches every page now: it must fit in what is available now."""
    if size > host.available:
        raise ConfigError(
            f"--prealloc {_gib(size)}: only {_gib(host.available)} can be allocated on "
            "this host now (MemAvailable and free swap)"
        )
