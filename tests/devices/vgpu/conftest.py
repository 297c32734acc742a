"""Each vGPU test gets its own host mdev registry (a fresh state directory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def mdev_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("VMFERRY_STATE_DIR", str(tmp_path / "state"))
    yield tmp_path / "state"
