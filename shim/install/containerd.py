"""Which containerd the node runs, and which config syntax its drop-in must use."""

from __future__ import annotations

import re
import shutil
import subprocess

from shim.install.errors import InstallError

# `containerd --version`: "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1"
# (Debian), "containerd github.com/containerd/containerd/v2 v2.1.4 <commit>" (upstream).
_VERSION = re.compile(r"^containerd\s+\S+\s+v?(\d+)\.(\d+)", re.MULTILINE)
VERSION_TIMEOUT = 30.0


def find_containerd(given: str | None) -> str:
    if given is not None:
        return given
    found = shutil.which("containerd")
    if found is None:
        raise InstallError("containerd is not on PATH; give its path with --containerd PATH")
    return found


def containerd_version(binary: str) -> tuple[int, int]:
    """(major, minor) from ``<binary> --version``."""
    try:
        result = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"cannot run {binary} --version: {exc}") from exc
    match = _VERSION.search(result.stdout)
    if result.returncode != 0 or match is None:
        output = (result.stdout + result.stderr).strip() or f"exit status {result.returncode}"
        raise InstallError(f"cannot tell containerd's version from `{binary} --version`: {output}")
    major, minor = int(match[1]), int(match[2])
    if (major, minor) < (1, 6) or major > 2:
        raise InstallError(f"containerd {major}.{minor} is not supported (1.6, 1.7 and 2.x are)")
    return major, minor


def drop_in_version(major: int, declared: object, config: str) -> int:
    """The drop-in's config ``version``: containerd's own syntax (2 on 1.x, 3 on 2.x) unless the
    main config declares an older one. ``declared`` is the main config's ``version`` (1 when it
    has no such line, None when the file does not exist yet).

    2.x treats the main config as version 3 once any drop-in says 3 (a version-2 main config
    then loses its CRI settings, seen with 2.1.9), while it migrates a version-2 drop-in. 1.x
    with a version-1 main config (no ``version`` line) fails on any version-2 drop-in.
    """
    native = 2 if major == 1 else 3
    if declared is None:
        return native
    if not isinstance(declared, int) or isinstance(declared, bool):
        raise InstallError(f"{config}: version = {declared!r} is not a config version")
    if major == 1 and declared != 2:
        raise InstallError(
            f"{config} is config version {declared} (no `version` line means 1); containerd 1.x "
            "reads drop-ins only with a version 2 main config: add `version = 2` at its top "
            "(and move any version-1 settings to version 2 syntax), then run again"
        )
    return native if declared < 2 else min(native, declared)
