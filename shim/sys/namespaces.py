"""Entering and creating Linux namespaces: setns(2) and unshare(2), which Python 3.11's os
module lacks (3.12 has them), called through the cffi helper. Both act on the calling thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from shim.sys._native import lib
from shim.sys.mount import make_slave
from shim.sys.native import last_error

# <sched.h>: the kernel's ABI.
CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def setns(fd: int, nstype: int) -> None:
    """Join the namespace open at `fd` (of type `nstype`, 0 for any)."""
    if lib.setns(fd, nstype) != 0:
        raise last_error("setns")


def unshare(flags: int) -> None:
    """Leave for new namespaces of the kinds in `flags`."""
    if lib.unshare(flags) != 0:
        raise last_error("unshare")


def run_in_netns(netns: str, function: Callable[[], T]) -> T:
    """``function()`` in a new thread that joined the netns at path `netns` (the thread ends
    with it, so no thread is ever left in a pod's netns). FileNotFoundError if it is gone."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _run_in_namespace(fd, CLONE_NEWNET, netns, function)
    finally:
        os.close(fd)


def _run_in_namespace(fd: int, nstype: int, name: str, function: Callable[[], T]) -> T:
    """``function()`` in a new thread that joined the namespace open at `fd`."""
    outcome: list[Any] = []

    def work() -> None:
        try:
            try:
                if nstype == CLONE_NEWNS:  # the kernel wants a root and cwd of the thread's own
                    unshare(CLONE_FS)
                setns(fd, nstype)
            except OSError as exc:
                raise OSError(exc.errno, f"{name}: {exc.strerror}") from None
            outcome.append((True, function()))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=work, name="setns", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


# The mount namespace this process left for its own (enter_private_mounts), open; None: it
# never did, and its mounts are the host's.
_host_mounts: int | None = None


def enter_private_mounts() -> None:
    """Move the process into a mount namespace of its own, its mounts slaves of the host's:
    the host's mounts and unmounts reach it (where the host's mounts are shared), none of its
    mounts reach the host. Only while the process has a single thread: a thread keeps the
    namespace it had, and the threads started later inherit their starter's."""
    global _host_mounts
    host = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare(CLONE_NEWNS)
        make_slave("/")
    except BaseException:
        os.close(host)
        raise
    _host_mounts = host


def in_host_mounts(function: Callable[[], T]) -> T:
    """``function()`` where paths are looked up as the host sees them now (in a thread that
    joined the host's mount namespace, if the process left it)."""
    if _host_mounts is None:
        return function()
    return _run_in_namespace(_host_mounts, CLONE_NEWNS, "the host's mount namespace", function)
