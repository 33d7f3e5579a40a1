"""Parsing of the stdio strings containerd clients send."""

from __future__ import annotations

import pytest

from shim.io.uri import BinaryTarget, FifoTarget, FileTarget, parse_stdio


def test_empty_string_means_stream_not_wanted() -> None:
    assert parse_stdio("") is None


@pytest.mark.parametrize(
    "value",
    [
        "/run/containerd/fifo/123/redis-stdout",
        "/tmp/odd name?with#chars%20",  # used verbatim, never URL-decoded
        "relative/fifo",
    ],
)
def test_bare_path_is_a_fifo_used_verbatim(value: str) -> None:
    assert parse_stdio(value) == FifoTarget(value)


def test_file_uri_gives_decoded_absolute_path() -> None:
    assert parse_stdio("file:///var/log/my%20app.log") == FileTarget("/var/log/my app.log")
    assert parse_stdio("file://localhost/var/log/x") == FileTarget("/var/log/x")


def test_binary_uri_args_are_key_then_first_value_in_order() -> None:
    target = parse_stdio("binary:///usr/bin/logger?foo=bar&x=1&foo=ignored&flag")
    assert target == BinaryTarget("/usr/bin/logger", ("foo", "bar", "x", "1", "flag", ""), False)


def test_binary_v2_requires_the_ready_byte() -> None:
    assert parse_stdio("binary-v2:///opt/log") == BinaryTarget("/opt/log", (), True)


@pytest.mark.parametrize(
    "value",
    [
        "fifo:///run/x",  # the Go shim accepts the scheme, then fails to open the URI as a path
        "npipe:///x",
        "http://example.com/x",
        "file://var/log/x",  # a host: the user meant file:///var/log/x
        "file:relative.log",
        "file:///var/log/x?rotate=1",
        "binary://",
    ],
)
def test_bad_uri_is_rejected(value: str) -> None:
    with pytest.raises(ValueError):
        parse_stdio(value)
