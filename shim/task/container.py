"""One container as a service keeps it: its backend, its init and execs, and the state rules on
them. Shared by the Task service and the VM's guest agent (which keep the same bookkeeping on
either side of the VM), so this imports nothing of the Task service or its APIs."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any, Generic, TypeVar

from shim.runtimes.base import Container
from shim.sys.oom import OomWatcher
from shim.task.process import Process, Status
from shim.task.requests import check_id
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Process)


def check_new_container(container_id: str, *taken: Collection[str]) -> None:
    """A create may use this id: valid, and in none of the `taken` (kept, or being created)."""
    check_id("container id", container_id)
    if any(container_id in ids for ids in taken):
        raise TtrpcError(Code.ALREADY_EXISTS, f"container {container_id}: already exists")


class ContainerRecord(Generic[P]):
    """A service's record of one container: backend, init and execs."""

    def __init__(self, id: str, bundle: str, backend: Container, init: P) -> None:
        self.id = id
        self.bundle = bundle
        self.backend = backend
        self.init = init
        self.execs: dict[str, P] = {}

    def process(self, exec_id: str) -> P:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"process does not exist {exec_id}") from None

    def check_new_exec(self, exec_id: str) -> None:
        """An exec may be added with this id: valid, unused, and the init can take it."""
        check_id("exec id", exec_id)
        if exec_id in self.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"id {exec_id}: already exists")
        self.init.require("exec in", Status.CREATED, Status.RUNNING)

    def exec_ids_by_pid(self) -> dict[int, str]:
        """The execs still running, for naming the pids the backend lists."""
        return {p.pid: p.exec_id for p in self.execs.values() if p.pid and not p.exit}

    async def update(self, resources: Mapping[str, Any]) -> None:
        self.init.require("update", Status.CREATED, Status.RUNNING, Status.PAUSED)
        await self.backend.update(resources)

    async def resume(self) -> None:
        self.init.require("resume", Status.PAUSED)
        await self.backend.resume()
        self.init.status = Status.RUNNING

    def watch_cgroup_oom(self, oom: OomWatcher) -> None:
        """OOM kills of the started init's cgroup go to `oom`."""
        from shim.sys.cgroups import Cgroup  # not on the Task service's path when unused

        try:
            oom.add(self.id, Cgroup.for_pid(self.init.pid))
        except OSError as exc:
            log.warning("%s: no OOM events: %s", self.id, exc)

    async def init_exited(self, oom: OomWatcher) -> None:
        """What the init's exit ends, before the exit is recorded: the backend's cleanup, and
        the OOM watch, whose kill not noticed yet (v2: memory.events changed, its inotify event
        not read) is this exit's cause, reported first, not never."""
        try:
            await self.backend.on_init_exit()
        except Exception:
            log.exception("cleanup after the init of %s exited", self.id)
        oom.check(self.id)
        oom.remove(self.id)
