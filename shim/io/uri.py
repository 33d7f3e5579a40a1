"""Parsing the stdio strings containerd clients send (PROTOCOL.md H.1).

A bare path is a FIFO the client created; `file://` appends to a file; `binary://` starts a
logging binary, and `binary-v2://` is the variant whose binary must write the ready byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit


@dataclass(frozen=True)
class FifoTarget:
    path: str


@dataclass(frozen=True)
class FileTarget:
    path: str


@dataclass(frozen=True)
class BinaryTarget:
    path: str
    args: tuple[str, ...]
    ready_required: bool  # binary-v2:// requires the ready byte; binary:// also accepts EOF


StdioTarget = FifoTarget | FileTarget | BinaryTarget


def parse_stdio(value: str) -> StdioTarget | None:
    """The target of one stdio string; None for "" (stream not wanted)."""
    if not value:
        return None
    # Bare paths are used verbatim: a FIFO name may contain '?', '#' or '%'.
    if value.startswith("/"):
        return FifoTarget(value)
    parts = urlsplit(value)
    if not parts.scheme:
        return FifoTarget(value)
    if parts.scheme not in ("file", "binary", "binary-v2"):
        raise ValueError(f"unsupported stdio scheme {parts.scheme!r} in {value!r}")
    # "file://var/log/x" would silently name "/log/x" on host "var"; refuse it.
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"stdio URI {value!r} has a host; use {parts.scheme}:///absolute/path")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"stdio URI {value!r} needs an absolute path")
    if parts.scheme == "file":
        if parts.query:
            raise ValueError(f"file stdio URI {value!r} takes no query")
        return FileTarget(path)
    return BinaryTarget(path, _binary_args(parts.query), parts.scheme == "binary-v2")


def _binary_args(query: str) -> tuple[str, ...]:
    # Each key, then its first value, as containerd's NewBinaryCmd builds argv.
    args: list[str] = []
    seen: set[str] = set()
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in seen:
            seen.add(key)
            args += (key, value)
    return tuple(args)
