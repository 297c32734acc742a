"""Fixtures: a fake VM and a QmpServer for it on a short socket path."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.qmp.fakes import FakeVm
from vmferry.qmp import QmpServer


@pytest.fixture
def sock_path() -> Iterator[str]:
    # pytest's tmp_path can pass the 107-byte limit of a Unix socket path.
    directory = tempfile.mkdtemp(prefix="qmp-", dir="/tmp")
    try:
        yield str(Path(directory) / "qmp.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def vm() -> FakeVm:
    return FakeVm()


@pytest.fixture
def server(sock_path: str, vm: FakeVm) -> Iterator[QmpServer]:
    with QmpServer(sock_path, vm) as srv:
        yield srv
