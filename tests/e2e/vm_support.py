"""What the VM backend's tests share: the run-time check that a VM can be booted here, which
also readies pykata's product install and its VM assets (product.py)."""

from __future__ import annotations

import functools
import re
import shutil

import pytest
from product import AssetsError, product_install


@functools.cache
def vm_unusable_reason() -> str | None:
    """Why no VM can boot here (no QEMU; no mkfs.erofs for the guest image; the product's
    `pyshim assets` fails, e.g. with no kernel to fetch), or None if one can. pykata's product
    install is made or brought up to date first; a checkout that does not install is an error
    (ProductError), not a reason to skip."""
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("mkfs.erofs", "erofs-utils")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed ({package})"
    try:
        product_install()
    except AssetsError as error:
        return f"pykata's VM assets cannot be set up: {error}"
    return None


def require_vm() -> None:
    reason = vm_unusable_reason()
    if reason:
        pytest.skip(reason)


def vm_starts(shim_log: str) -> list[str]:
    """How each VM in a shim log started, in order: "restored" (from a template) or "booted"."""
    return re.findall(r"VM \w+: QEMU \d+ on \w+, VmSize\([^)]*\), (restored|booted)", shim_log)


def cold_boot_reasons(shim_log: str) -> list[str]:
    """The shim's messages of templates that could not be made or restored (for an assertion's
    message: why a VM booted cold)."""
    return re.findall(r'msg="([^"]*booting cold)"', shim_log)
