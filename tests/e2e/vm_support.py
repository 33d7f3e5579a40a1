"""What the VM backend's tests share: the run-time check that a VM can be booted here."""

from __future__ import annotations

import functools
import shutil
import subprocess

import pytest
from harness import REPO


@functools.cache
def vm_unusable_reason() -> str | None:
    """Why no VM can boot here (no QEMU; no kernel, and scripts/fetch-kernel cannot get one),
    or None if one can."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    if not any((REPO / "var" / "kernel" / "boot").glob("vmlinuz-*")):
        fetched = subprocess.run(
            [REPO / "scripts" / "fetch-kernel"], capture_output=True, text=True, timeout=600
        )
        if fetched.returncode != 0:
            return f"no kernel for the VM: {fetched.stderr.strip()[-300:]}"
    return None


def require_vm() -> None:
    reason = vm_unusable_reason()
    if reason:
        pytest.skip(reason)
