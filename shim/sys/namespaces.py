"""Entering and creating Linux namespaces: setns(2) and unshare(2), which Python 3.11's os
module lacks (3.12 has them), called through the C library. Both act on the calling thread."""

from __future__ import annotations

import ctypes
import os

# <sched.h>: the kernel's ABI.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int) -> None:
    """Join the namespace open at `fd` (of type `nstype`, 0 for any)."""
    if _libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def unshare(flags: int) -> None:
    """Leave for new namespaces of the kinds in `flags`."""
    if _libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
