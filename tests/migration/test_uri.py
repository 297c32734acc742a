"""Migration URIs as the user writes them, and as messages show them again."""

from __future__ import annotations

import pytest

from vmferry.errors import ConfigError
from vmferry.migration.channel import parse_uri


@pytest.mark.parametrize(
    "text", ["tcp:127.0.0.1:4444", "tcp:[::1]:4444", "tcp:host.example:0", "file:/tmp/vm.state"]
)
def test_a_uri_reads_back_as_it_was_written(text: str) -> None:
    assert str(parse_uri(text)) == text


def test_an_ipv6_host_loses_its_brackets_only_inside() -> None:
    uri = parse_uri("tcp:[fe80::1]:7")
    assert (uri.host, uri.port) == ("fe80::1", 7)


@pytest.mark.parametrize("text", ["udp:1.2.3.4:5", "tcp:host", "tcp::5", "tcp:h:99999", "file:"])
def test_a_bad_uri_is_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="expected tcp:HOST:PORT or file:PATH"):
        parse_uri(text)
