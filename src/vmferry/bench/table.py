"""Benchmark results as a table on the terminal and, optionally, as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_rows(
    title: str, columns: Sequence[str], rows: list[dict[str, Any]], json_path: str | None
) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == "mode" else "right")
    for r in rows:
        table.add_row(*(_cell(r[c]) for c in columns))
    Console(width=200).print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
