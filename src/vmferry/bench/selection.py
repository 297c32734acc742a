"""A bench option that picks some keys of a table: ``--cases`` and ``--workloads``."""

from __future__ import annotations

from collections.abc import Mapping

from vmferry.errors import ConfigError


def parse_selection(option: str, text: str, known: Mapping[str, object]) -> tuple[str, ...]:
    """``a, c`` → ("a", "c"): keys of ``known``, each once, in ``known``'s order (the order
    the bench runs them in, not the order typed)."""
    asked = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(asked - known.keys())
    if unknown or not asked:
        raise ConfigError(
            f"{option} {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(known)}"
        )
    return tuple(k for k in known if k in asked)


__all__ = ["parse_selection"]
