"""The host's state directory: where it is, and that a planted one is refused."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import vmferry
from vmferry.errors import ConfigError
from vmferry.state_dir import default_state_dir, ensure_state_dir


def test_where_the_state_directory_is() -> None:
    assert default_state_dir({"VMFERRY_STATE_DIR": "/x"}, euid=1000) == Path("/x")
    assert default_state_dir({}, euid=0) == Path("/run/vmferry")
    xdg = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_state_dir(xdg, euid=1000) == Path("/run/user/1000/vmferry")
    assert default_state_dir({}, euid=1000).name == "vmferry-1000"


@pytest.fixture
def sticky(tmp_path: Path) -> Path:
    """A world-writable sticky directory, as /tmp is."""
    d = tmp_path / "tmp"
    d.mkdir()
    d.chmod(0o1777)
    return d


def test_a_new_state_directory_is_private(sticky: Path) -> None:
    d = ensure_state_dir(sticky / "vmferry-me")
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert ensure_state_dir(d) == d  # and it is accepted the next time


def test_a_state_directory_open_to_others_is_refused(sticky: Path) -> None:
    d = sticky / "vmferry-me"
    d.mkdir()
    d.chmod(0o755)
    with pytest.raises(ConfigError, match="mode 0755; it must be 0700"):
        ensure_state_dir(d)


def test_a_symlink_planted_as_the_state_directory_is_refused(sticky: Path, tmp_path: Path) -> None:
    (sticky / "vmferry-me").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_state_dir(sticky / "vmferry-me")


@pytest.mark.root
def test_a_state_directory_owned_by_another_user_is_refused(
    sticky: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = sticky / "vmferry-me"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        ensure_state_dir(d)
    # Through the CLI, as a user would meet it: one line, exit 125, nothing written there.
    monkeypatch.setenv("VMFERRY_STATE_DIR", str(d))
    r = vmferry("sriov", "set-numvfs", "pf0", "2")
    assert r.returncode == 125 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"vmferry: error: state directory {d} belongs to uid 65534, not to you (uid "
        f"{os.geteuid()}): refused; remove it or set VMFERRY_STATE_DIR"
    ]
    assert list(d.iterdir()) == []


def test_a_private_directory_elsewhere_is_just_created(tmp_path: Path) -> None:
    d = ensure_state_dir(tmp_path / "a" / "b")
    assert d.is_dir()


def test_set_numvfs_0_removes_the_pf(tmp_path: Path) -> None:
    sd = ["sriov", "--state-dir", str(tmp_path)]
    assert vmferry(*sd, "set-numvfs", "pf0", "2").returncode == 0
    assert vmferry(*sd, "set-numvfs", "pf1", "1").returncode == 0
    r = vmferry(*sd, "set-numvfs", "pf0", "0")
    assert r.returncode == 0 and b"removed" in r.stdout, r.stderr
    listed = json.loads(vmferry(*sd, "list", "--json").stdout)
    assert [p["pf"] for p in listed] == ["pf1"]
