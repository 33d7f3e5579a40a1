"""What the node's runsc offers the runsc.toml that install writes: its top-level flags."""

from __future__ import annotations

import re
import shutil
import subprocess

FLAGS_TIMEOUT = 30.0
_FLAG = re.compile(r"^\s+-([a-z0-9][a-z0-9-]*)", re.MULTILINE)


def runsc_flags(binary: str = "runsc") -> set[str] | None:
    """The flag names `runsc flags` lists (it prints them on stderr); None without a runsc
    that answers."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        result = subprocess.run(
            [path, "flags"], capture_output=True, text=True, timeout=FLAGS_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = set(_FLAG.findall(result.stdout + result.stderr))
    return names if result.returncode == 0 and names else None
