"""What the gVisor and checkpoint e2e tests share: run-time checks of the machine's
capabilities, and `ctr containers restore`'s FIFOs, which ctr leaves behind."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CTR_DEFAULT_FIFO_DIR = Path("/run/containerd/fifo")  # where ctr puts FIFOs without --fifo-dir
RUNSC_ROOT = Path("/run/containerd/runsc")  # pyrunsc's runsc --root (then the namespace)


@functools.cache
def runsc_unusable_reason() -> str | None:
    """Why runsc cannot run a sandbox here, or None if it can."""
    if shutil.which("runsc") is None:
        return "runsc is not installed"
    with tempfile.TemporaryDirectory(prefix="pyshim-runsc-probe-") as root:
        try:
            probe = subprocess.run(
                ["runsc", "--root", root, "--network=none", "do", "true"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return "`runsc do true` did not finish in 60 s"
    if probe.returncode != 0:
        return f"`runsc do true` fails here: {probe.stderr.strip()[-300:]}"
    return None


def require_runsc() -> None:
    reason = runsc_unusable_reason()
    if reason:
        pytest.skip(reason)


@functools.cache
def criu_unusable_reason() -> str | None:
    """Why runc cannot checkpoint here (`criu check` fails), or None if it can."""
    if shutil.which("criu") is None:
        return "criu is not installed"
    check = subprocess.run(
        ["criu", "check"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    if check.returncode != 0:
        lines = (check.stderr or check.stdout).strip().splitlines()
        return f"`criu check` fails on this machine: {lines[-1] if lines else check.returncode}"
    return None


@contextmanager
def removing_ctr_fifos(container_id: str) -> Iterator[None]:
    """Remove the FIFO dirs that ctr makes for `container_id` in its default FIFO dir and
    never removes (`ctr containers restore` exits right after starting the task)."""
    before = set(CTR_DEFAULT_FIFO_DIR.iterdir()) if CTR_DEFAULT_FIFO_DIR.is_dir() else set()
    try:
        yield
    finally:
        if CTR_DEFAULT_FIFO_DIR.is_dir():
            for entry in set(CTR_DEFAULT_FIFO_DIR.iterdir()) - before:
                if any(f.name.startswith(f"{container_id}-") for f in entry.iterdir()):
                    shutil.rmtree(entry, ignore_errors=True)
