"""The one owner of waitpid: reaps every child of the daemon and routes each exit to its watcher.

The daemon is a child subreaper, so besides the children it spawns it also inherits orphans
(a container init after `runc create` exits, `runc exec --detach` processes). Their pids are
only learnt later from pid files; `collect()` keeps their exits until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

from shim.sys._native import lib
from shim.sys.native import last_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int  # exit code, or 128 + signal number when killed by a signal
    exited_at_ns: int  # time.time_ns() when reaped


def exit_status(wait_status: int) -> int:
    """The shell convention containerd reports: exit code, or 128 + signal number."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


class _Window:
    """An open collect() window: the unwatched exits seen while it was open. (A class, not a
    bare dict, so that closing removes this window and not an equal one.)"""

    def __init__(self) -> None:
        self.exits: dict[int, Exit] = {}


class Reaper:
    def __init__(self, loop: asyncio.AbstractEventLoop, was_subreaper: bool) -> None:
        self._loop = loop
        self._was_subreaper = was_subreaper
        self._watchers: dict[int, list[asyncio.Future[Exit]]] = {}
        self._windows: list[_Window] = []
        self._closed = False

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop) -> Reaper:
        """Become a child subreaper and reap on SIGCHLD from now on."""
        was_subreaper = _is_child_subreaper()
        if lib.pyshim_set_child_subreaper() != 0:
            raise last_error("prctl(PR_SET_CHILD_SUBREAPER)")
        reaper = cls(loop, was_subreaper)
        loop.add_signal_handler(signal.SIGCHLD, reaper._reap)
        # Children that exited before the handler existed sent a SIGCHLD nobody heard.
        reaper._reap()
        return reaper

    def watch(self, pid: int) -> asyncio.Future[Exit]:
        """The exit of `pid`; call it synchronously as soon as the pid is known."""
        future: asyncio.Future[Exit] = self._loop.create_future()
        kept = self._take_kept(pid)
        if kept is not None:
            future.set_result(kept)
        else:
            self._watchers.setdefault(pid, []).append(future)
        return future

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Keep exits of unwatched pids while open, so `watch` can still find them."""
        window = _Window()
        self._windows.append(window)
        try:
            yield
        finally:
            self._windows.remove(window)

    def _reap(self) -> None:
        """Reap every child that has exited (the SIGCHLD handler)."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._route(Exit(pid, exit_status(wait_status), time.time_ns()))

    def close(self) -> None:
        """Stop reaping, cancel pending watches and restore the subreaper setting."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_signal_handler(signal.SIGCHLD)
        for futures in self._watchers.values():
            for future in futures:
                future.cancel()
        self._watchers.clear()
        if not self._was_subreaper and lib.pyshim_clear_child_subreaper() != 0:
            raise last_error("prctl(PR_SET_CHILD_SUBREAPER, 0)")

    def _route(self, reaped: Exit) -> None:
        futures = self._watchers.pop(reaped.pid, None)
        if futures is not None:
            for future in futures:
                if not future.done():
                    future.set_result(reaped)
        elif self._windows:
            for window in self._windows:
                window.exits[reaped.pid] = reaped
        else:
            log.debug("reaped unwatched pid %d (status %d)", reaped.pid, reaped.status)

    def _take_kept(self, pid: int) -> Exit | None:
        # Taken from every window: a later process reusing the pid must not get this exit.
        found = None
        for window in self._windows:
            found = window.exits.pop(pid, found)
        return found


def _is_child_subreaper() -> bool:
    value = lib.pyshim_is_child_subreaper()
    if value < 0:
        raise last_error("prctl(PR_GET_CHILD_SUBREAPER)")
    return value == 1
