"""OOM-kill notifications for containers' cgroups, delivered on the event loop (TaskOOM).

v1: an eventfd registered for memory.oom_control through cgroup.event_control; the kernel also
signals it when the cgroup is removed, which is told apart by the cgroup being gone.
v2: inotify on memory.events; an OOM is a rise of its oom_kill counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from shim.sys._native import lib
from shim.sys.cgroups import Cgroup
from shim.sys.native import last_error

log = logging.getLogger(__name__)

_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of name
_INOTIFY_READ_SIZE = 4096


@dataclass
class _V2Watch:
    container_id: str
    events_file: str
    oom_kills: int  # the counter when last looked at


class OomWatcher:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_oom: Callable[[str], None]) -> None:
        self._loop = loop
        self._on_oom = on_oom
        self._eventfds: dict[str, tuple[int, str]] = {}  # v1: id -> (eventfd, memory dir)
        self._inotify: int | None = None  # v2: one inotify fd for every container
        self._watches: dict[int, _V2Watch] = {}  # v2: watch descriptor -> watch

    def add(self, container_id: str, cgroup: Cgroup) -> None:
        """Report OOM kills in `cgroup` as `on_oom(container_id)`; OSError if not possible."""
        self.remove(container_id)
        memory_dir = cgroup.path("memory")
        if cgroup.version == 1:
            self._add_v1(container_id, memory_dir)
        else:
            self._add_v2(container_id, os.path.join(memory_dir, "memory.events"))

    def remove(self, container_id: str) -> None:
        entry = self._eventfds.pop(container_id, None)
        if entry is not None:
            self._loop.remove_reader(entry[0])
            os.close(entry[0])
        for wd, watch in list(self._watches.items()):
            if watch.container_id == container_id:
                del self._watches[wd]
                if self._inotify is not None:
                    # EINVAL when the kernel dropped the watch already (file removed): fine.
                    lib.inotify_rm_watch(self._inotify, wd)

    def check(self, container_id: str) -> None:
        """Reports an OOM kill of the container not yet reported, without waiting for the loop
        to notice: for an exit (maybe by that kill) that must be reported after it."""
        entry = self._eventfds.get(container_id)
        if entry is not None:
            try:
                os.eventfd_read(entry[0])
            except BlockingIOError:
                pass
            else:
                self._on_oom(container_id)
        for wd, watch in list(self._watches.items()):
            if watch.container_id == container_id:
                self._check_v2(wd, watch)

    def close(self) -> None:
        for container_id in list(self._eventfds):
            self.remove(container_id)
        if self._inotify is not None:
            self._loop.remove_reader(self._inotify)
            os.close(self._inotify)
            self._inotify = None
            self._watches.clear()

    def _add_v1(self, container_id: str, memory_dir: str) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(os.path.join(memory_dir, "memory.oom_control"), os.O_RDONLY)
            try:
                with open(os.path.join(memory_dir, "cgroup.event_control"), "w") as f:
                    f.write(f"{efd} {control}")
            finally:
                os.close(control)
        except OSError:
            os.close(efd)
            raise
        self._eventfds[container_id] = (efd, memory_dir)
        self._loop.add_reader(efd, self._on_v1_event, container_id)

    def _on_v1_event(self, container_id: str) -> None:
        efd, memory_dir = self._eventfds[container_id]
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(efd)
        if not os.path.exists(os.path.join(memory_dir, "memory.oom_control")):
            self.remove(container_id)  # the cgroup was removed: not an OOM
            return
        self._on_oom(container_id)

    def _add_v2(self, container_id: str, events_file: str) -> None:
        oom_kills = _oom_kills(events_file)
        if self._inotify is None:
            fd = lib.inotify_init1(lib.IN_NONBLOCK | lib.IN_CLOEXEC)
            if fd < 0:
                raise last_error("inotify_init1")
            self._inotify = fd
            self._loop.add_reader(fd, self._on_inotify)
        wd = lib.inotify_add_watch(self._inotify, os.fsencode(events_file), lib.IN_MODIFY)
        if wd < 0:
            raise last_error(f"inotify_add_watch {events_file}")
        self._watches[wd] = _V2Watch(container_id, events_file, oom_kills)

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        try:
            data = os.read(self._inotify, _INOTIFY_READ_SIZE)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            wd, mask, _, name_len = _INOTIFY_EVENT.unpack_from(data, offset)
            offset += _INOTIFY_EVENT.size + name_len
            watch = self._watches.get(wd)
            if watch is None:
                continue
            if mask & lib.IN_IGNORED:  # the file is gone with its cgroup
                del self._watches[wd]
                continue
            self._check_v2(wd, watch)

    def _check_v2(self, wd: int, watch: _V2Watch) -> None:
        try:
            oom_kills = _oom_kills(watch.events_file)
        except OSError:  # removed under us (ENOENT, or ENODEV while being deleted)
            self._watches.pop(wd, None)
            return
        if oom_kills > watch.oom_kills:
            watch.oom_kills = oom_kills
            self._on_oom(watch.container_id)


def _oom_kills(events_file: str) -> int:
    with open(events_file) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0
