"""Entering and creating Linux namespaces: setns(2) and unshare(2), which Python 3.11's os
module lacks (3.12 has them), called through the C library. Both act on the calling thread."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

# <sched.h>: the kernel's ABI.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


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


def run_in_netns(netns: str, function: Callable[[], T]) -> T:
    """``function()`` in a new thread that joined the netns at path `netns` (the thread ends
    with it, so no thread is ever left in a pod's netns). FileNotFoundError if it is gone."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    outcome: list[Any] = []

    def work() -> None:
        try:
            try:
                setns(fd, CLONE_NEWNET)
            except OSError as exc:
                raise OSError(exc.errno, f"setns {netns}: {exc.strerror}") from None
            outcome.append((True, function()))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    try:
        thread = threading.Thread(target=work, name="netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
