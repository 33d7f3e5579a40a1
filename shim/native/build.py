"""Builds the native shim launcher (launcher.c) with the C compiler the cffi helper needs.

Imports only shim.flags (which imports nothing): setup.py loads it before the package is
installed. The launcher parses containerd's flags as shim.flags does, with its list of flags
that take a value given at compile time.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from shim.flags import VALUE_FLAGS

SOURCE = Path(__file__).with_name("launcher.c")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")


def build_launcher(output: Path) -> bool:
    """Compile the launcher to ``output``; False when no C compiler could (the shims are then
    the pure-Python console scripts)."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    value_flags = ",".join(f'"{name}"' for name in sorted(VALUE_FLAGS))
    defines = [f"-DVALUE_FLAGS={value_flags}"]
    try:
        subprocess.run([*compiler, *CFLAGS, *defines, "-o", str(output), str(SOURCE)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"pyshim: no native shim launcher ({exc})", file=sys.stderr)
        return False
    return True


def build_launchers(directory: Path, names: list[str]) -> list[str] | None:
    """The launcher built once and copied under each shim's name: their paths, or None (also
    when PYSHIM_NATIVE_LAUNCHER=0 asks for the pure-Python shims)."""
    if os.environ.get("PYSHIM_NATIVE_LAUNCHER") == "0":
        return None
    directory.mkdir(parents=True, exist_ok=True)
    built = directory / "launcher"
    if not build_launcher(built):
        return None
    for name in names:
        shutil.copy2(built, directory / name)
    return [str(directory / name) for name in names]
