"""Per-process state: what containerd sees of an init or exec process, and which operations each
state allows."""

from __future__ import annotations

import asyncio
import enum
import os
import signal
from dataclasses import dataclass
from typing import Any

from shim.io.stdio import ProcessIO
from shim.sys.reaper import Exit
from shim.ttrpc.errors import Code, TtrpcError

# Go's zero time (0001-01-01T00:00:00Z): what the reference shims send for "not exited".
NOT_EXITED_SECONDS = -62135596800


class Status(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


# containerd.v1.types.Status numbers.
STATUS_CODES = {
    Status.CREATED: 1,
    Status.RUNNING: 2,
    Status.STOPPED: 3,
    Status.DELETED: 3,
    Status.PAUSED: 4,
    Status.PAUSING: 5,
}


@dataclass(frozen=True)
class StdioRequest:
    """The stdio strings exactly as containerd sent them (State echoes them back)."""

    stdin: str
    stdout: str
    stderr: str
    terminal: bool


class Process:
    """An init or exec process of a container."""

    def __init__(self, container_id: str, exec_id: str, stdio: StdioRequest) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.status = Status.CREATED
        self.exit: Exit | None = None
        self.exited = asyncio.Event()
        self.io: ProcessIO | None = None
        # Held from launch until the start event is queued, so that event always precedes
        # the process's exit event.
        self.lock = asyncio.Lock()
        self._pidfd: int | None = None
        self.spec: dict[str, Any] = {}  # an exec's OCI Process, kept from Exec until Start

    @property
    def id(self) -> str:
        """The id containerd uses in State and TaskExit: the exec id, or the container id."""
        return self.exec_id or self.container_id

    @property
    def is_init(self) -> bool:
        return not self.exec_id

    def require(self, operation: str, *allowed: Status) -> None:
        if self.status not in allowed:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"cannot {operation} a {self.status.value} process"
            )

    def launched(self, pid: int) -> None:
        self.pid = pid
        self.status = Status.RUNNING
        try:
            # A pidfd pins this exact process: a recycled pid is never signalled by mistake.
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            self._pidfd = None

    def set_exited(self, exit: Exit) -> None:
        self.exit = exit
        if self.status is not Status.DELETED:
            self.status = Status.STOPPED
        self.exited.set()
        self._close_pidfd()

    def signal(self, signum: int) -> None:
        """Signal a started exec process directly (no runtime call needed)."""
        if self.pid == 0:
            raise TtrpcError(Code.FAILED_PRECONDITION, "process not created")
        if self.exit is not None or self._pidfd is None:
            raise TtrpcError(Code.NOT_FOUND, "process already finished")
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError as exc:
            raise TtrpcError(Code.NOT_FOUND, "process already finished") from exc

    @property
    def exit_status(self) -> int:
        return self.exit.status if self.exit else 0

    @property
    def exited_at_ns(self) -> int | None:
        return self.exit.exited_at_ns if self.exit else None

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def forget(self) -> None:
        self.status = Status.DELETED
        self._close_pidfd()
