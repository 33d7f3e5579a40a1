"""The backend interface: what a runtime must do for the Task service.

The service owns everything containerd sees (state machines, events, stdio, exit ordering); a
backend only runs processes. An operation a backend cannot do raises ``NotImplementedError``,
which the ttrpc server answers with ``Unimplemented``.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from shim.sys.reaper import Exit, Reaper

INIT_PID_FILE = "init.pid"  # in the bundle: the init's host pid, for `delete` after the shim


def recorded_init_pid(bundle: str) -> int:
    """The init pid a backend recorded in the bundle, 0 if it is not known."""
    try:
        with open(os.path.join(bundle, INIT_PID_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class ShimContext:
    """What every backend of one shim daemon knows about its surroundings."""

    namespace: str
    runtime_name: str  # e.g. io.containerd.pyrunc.v1
    reaper: Reaper
    debug: bool = False


@dataclass(frozen=True)
class ProcessStdio:
    """The container-side stdio a backend hands to the process it starts."""

    stdin: int | None
    stdout: int | None
    stderr: int | None
    terminal: bool


@dataclass
class Launched:
    """A process the backend started: its host pid, how its exit is learned, its pty."""

    pid: int
    exited: asyncio.Future[Exit]
    console_master: int | None = None


@dataclass(frozen=True)
class ContainerConfig:
    id: str
    bundle: str
    stdio: ProcessStdio
    options: Any | None  # google.protobuf.Any from CreateTaskRequest / start stdin, or None
    checkpoint: str = ""  # CreateTaskRequest's parent_checkpoint is not read: see runc.py


@dataclass(frozen=True)
class CheckpointRequest:
    path: str
    options: Any | None  # google.protobuf.Any of the backend's checkpoint options


class Container(ABC):
    """One container of a backend, from create to delete."""

    @abstractmethod
    async def create(self) -> Launched | None:
        """Create the init process (not yet running user code). None when the start is deferred
        (restore from a checkpoint): then :meth:`start` launches it."""

    @abstractmethod
    async def start(self) -> Launched | None:
        """Let the init run. Returns the process when create deferred it, else None."""

    @abstractmethod
    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        """Start an additional process (an OCI Process spec) in the container."""

    @abstractmethod
    async def kill(self, signal: int, all_processes: bool) -> None:
        """Signal the init (or every process of the container)."""

    @abstractmethod
    async def delete(self, force: bool = False) -> None:
        """Remove the container from the runtime; it has no running process."""

    async def kill_exec(self, exec_id: str, signal: int) -> bool:
        """Signal a running exec through the runtime, when its host pid is not the process
        itself (a runsc exec pid only waits for it). False: the service signals the pid."""
        return False

    async def delete_exec(self, exec_id: str) -> None:  # noqa: B027 - optional hook
        """Called when an exited exec is deleted, for a runtime that holds its state."""

    async def resize(self, exec_id: str, width: int, height: int) -> None:  # noqa: B027
        """Called after the service resized the process's pty, for a runtime whose process
        has its terminal elsewhere (a VM's guest)."""

    def reports_oom(self, report: Callable[[], None]) -> bool:
        """True if the backend reports the container's OOM kills through `report` itself,
        before the init's exit (its processes are in no host cgroup); False: the service
        watches the init's cgroup."""
        return False

    async def pause(self) -> None:
        raise NotImplementedError("pause")

    async def resume(self) -> None:
        raise NotImplementedError("resume")

    async def pids(self) -> Sequence[int]:
        raise NotImplementedError("pids")

    async def update(self, resources: Mapping[str, Any]) -> None:
        raise NotImplementedError("update")

    async def stats(self) -> Any:
        """A google.protobuf.Any holding io.containerd.cgroups.v1/v2 Metrics."""
        raise NotImplementedError("stats")

    async def checkpoint(self, request: CheckpointRequest) -> None:
        raise NotImplementedError("checkpoint")

    async def on_init_exit(self) -> None:  # noqa: B027 - optional hook
        """Called once when the init has exited, before its exit is published (e.g. to kill
        what is left of a container that shares the host's pid namespace)."""


class Runtime(ABC):
    """A backend: makes containers. One instance per shim daemon."""

    # The daemon serves from a mount namespace of its own (shim.sys.namespaces.
    # enter_private_mounts): its mounts stay out of the host's.
    private_mounts: ClassVar[bool] = False

    def __init__(self, context: ShimContext) -> None:
        self.context = context

    @abstractmethod
    def container(self, config: ContainerConfig) -> Container:
        """A container object for ``config``; nothing runs until ``create``."""

    @classmethod
    @abstractmethod
    def cleanup(cls, namespace: str, bundle: str, container_id: str) -> int:
        """The ``delete`` command: tidy up after a dead shim (safe to run twice). Returns the
        init pid, or 0 when it is not known."""

    @classmethod
    def preload(cls) -> None:
        """Import what this backend's daemons import only later (a heavy library some of its
        containers need): called in the template, which forks the daemons, so that those pages
        are imported once and shared by every daemon instead of copied into each."""
        return None

    @classmethod
    def features(cls, options: Any | None) -> bytes | None:
        """For ``-info``: the OCI runtime features document (JSON, as ``runc features`` prints
        it) under these runtime options (a google.protobuf.Any), or None if not known."""
        return None
