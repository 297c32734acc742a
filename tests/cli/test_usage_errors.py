"""Bad usage is bad input: one line naming what was wrong and the --help to read, exit
125, never argparse's usage block and exit 2; --help still prints help and exits 0."""

from __future__ import annotations

import pytest

from tests.conftest import vmferry


@pytest.mark.parametrize(
    "argv,what,command",
    [
        (["run", "--vcpus", "x"], "--vcpus: invalid int value: 'x'", "vmferry run"),
        (["run", "--memory", "-1G"], "--memory/-m: expected one argument", "vmferry run"),
        (["run", "memtouch", "--bogus"], "unrecognized arguments: --bogus", "vmferry run"),
        (["run", "--save-after", "1"], "--save-after: expected 2 arguments", "vmferry run"),
        (["migrate"], "required: uri, --qmp", "vmferry migrate"),
        (["migrate", "--qmp", "/tmp/x.qmp"], "required: uri", "vmferry migrate"),
        (["migrate", "tcp:127.0.0.1:1"], "required: --qmp", "vmferry migrate"),
        (["migrate", "--qmp", "s", "tcp:h:1", "--channels", "x"], "--channels", "vmferry migrate"),
        (["migrate", "--qmp", "s", "tcp:h:1", "--compress", "lz4"], "'lz4'", "vmferry migrate"),
        (["nosuch"], "invalid choice: 'nosuch'", "vmferry"),
        ([], "required: COMMAND", "vmferry"),
        (["sriov", "set-numvfs", "pf0", "x"], "numvfs", "vmferry sriov set-numvfs"),
        (["sriov", "set-numvfs", "pf0", "1", "--zz"], "--zz", "vmferry sriov set-numvfs"),
        (["traffic"], "required: --to, --mac", "vmferry traffic"),
        (["bench", "nosuch"], "invalid choice: 'nosuch'", "vmferry bench"),
        (["tls", "make-creds"], "required: DIR", "vmferry tls make-creds"),
    ],
)
def test_usage_errors_are_one_line_and_exit_125(argv: list[str], what: str, command: str) -> None:
    r = vmferry(*argv, timeout=30)
    assert r.returncode == 125, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vmferry: error: "), lines
    assert what in lines[0], lines[0]
    assert lines[0].endswith(f"(see '{command} --help')"), lines[0]
    assert r.stdout == b""


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["sriov", "set-numvfs", "-h"]])
def test_help_still_prints_help_and_exits_0(argv: list[str]) -> None:
    r = vmferry(*argv, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"usage: vmferry"), r.stdout
