"""migrate resume while post-copy is paused: its URI is checked before anything is queued
(tcp:HOST:PORT only, one line naming what was given), and giving up is its own signal:
an empty or malformed URI is refused and never gives the VM up."""

from __future__ import annotations

from typing import Any, cast

import pytest

from vmferry.errors import MigrationError
from vmferry.migration.channel import MigrationUri
from vmferry.migration.handover import StillReleased
from vmferry.migration.postcopy.source_side import PostcopySource, resume_target


@pytest.mark.parametrize(
    "uri",
    ["", "tcp:", "tcp:host", "tcp:host:port", "tcp::4444", "tcp:h:70000", "tcp:h:0", "file:/tmp/x",
     "unix:/tmp/s", "host:4444"],
)  # fmt: skip
def test_a_uri_that_is_not_tcp_host_port_is_refused_in_one_line(uri: str) -> None:
    with pytest.raises(MigrationError) as e:
        resume_target(uri)
    assert str(e.value) == (
        "post-copy resumes over tcp:HOST:PORT only (the address migrate-recover listens on), "
        f"not {uri!r}"
    )


def test_a_tcp_uri_is_the_target() -> None:
    assert resume_target("tcp:127.0.0.1:4444") == MigrationUri("tcp", "127.0.0.1", 4444)
    assert resume_target("tcp:[::1]:4444") == MigrationUri("tcp", "::1", 4444)


def _paused_source() -> PostcopySource:
    # resume, give_up and await_resume up to the link touch none of these.
    none = cast(Any, None)
    return PostcopySource(none, none, none, none)


def test_an_empty_uri_is_refused_and_does_not_give_the_vm_up() -> None:
    pc = _paused_source()
    with pytest.raises(MigrationError, match="not ''"):
        pc.resume("")
    with pytest.raises(MigrationError, match="not 'tcp:nowhere'"):
        pc.resume("tcp:nowhere")
    assert pc._resume.empty(), "a refused URI queued something for the migration's thread"
    pc.resume("tcp:127.0.0.1:4444")
    assert pc._resume.get_nowait() == MigrationUri("tcp", "127.0.0.1", 4444)


def test_giving_up_is_its_own_signal() -> None:
    pc = _paused_source()
    pc.give_up()
    with pytest.raises(StillReleased, match="given up while paused"):
        pc.await_resume()
