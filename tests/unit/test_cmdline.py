"""A forked shim's command line, written over its argv strings."""

from __future__ import annotations

import subprocess
import sys

# Runs as `python -c SHOW ARGS...`: its argv area (interpreter, -c, this text, ARGS) has room
# for ARGS alone, or is cut when asked to show more than it holds.
SHOW = """
import sys
from shim.sys.cmdline import set_cmdline
def read(name):
    with open(f"/proc/self/{name}", "rb") as f:
        return f.read()
size, environ = len(read("cmdline")), read("environ")
set_cmdline(sys.argv[1:] if sys.argv[1] != "long" else ["y" * 4 * size])
kept = read("environ") == environ
sys.stdout.buffer.write(f"{size} {kept} ".encode() + read("cmdline"))
"""


def show(*args: str) -> tuple[int, bytes]:
    """The argv area's size and what /proc/self/cmdline shows after set_cmdline."""
    out = subprocess.run([sys.executable, "-c", SHOW, *args], capture_output=True, check=True)
    size, kept, shown = out.stdout.split(b" ", 2)
    assert kept == b"True", "the environment changed"
    return int(size), shown


def test_the_new_arguments_replace_the_old_ones() -> None:
    size, shown = show("/bin/containerd-shim-pyrunc-v1", "-id", "abc")
    assert len(shown) == size  # the same area, the rest padded with NULs
    assert shown.rstrip(b"\0").split(b"\0") == [b"/bin/containerd-shim-pyrunc-v1", b"-id", b"abc"]


def test_what_does_not_fit_is_cut_and_the_environment_kept() -> None:
    size, shown = show("long")
    assert shown == b"y" * (size - 1) + b"\0"
