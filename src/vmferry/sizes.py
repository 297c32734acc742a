"""Sizes as people write them ('512M', '1.5G'): one reader for every layer (the machine's
RAM, a vGPU's VRAM, a device's DMA-log page), so none imports another just for this."""

from __future__ import annotations

import re
from fractions import Fraction

from vmferry.errors import ConfigError

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
