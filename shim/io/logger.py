"""Logging binaries for `binary://` stdio (PROTOCOL.md H.5).

The binary gets the container's stdout and stderr pipes as fds 3 and 4 and signals that it is
ready on fd 5, by writing a byte or (binary:// only) by closing it. A binary that dies or
stays silent fails the process start with a clear error instead of a hung Create.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from shim.io.uri import BinaryTarget
from shim.sys.reaper import Exit, Reaper
from shim.sys.spawn import spawn

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0
# containerd gives a logger this long to flush after SIGTERM before SIGKILL.
STOP_TIMEOUT = 12.0
# A logger that exits closes fd 5 just before the reaper hears of it; EOF from a binary://
# logger counts as ready only if it is still alive this long after.
_EXIT_GRACE = 0.05


class LoggerStartError(RuntimeError):
    """The logging binary could not be started or did not become ready."""


class LoggerTimeoutError(LoggerStartError, TimeoutError):
    """The logging binary did not signal ready in time."""


class LoggingBinary:
    def __init__(self, target: BinaryTarget, pid: int, exited: asyncio.Future[Exit]) -> None:
        self.target = target
        self.pid = pid
        self.exited = exited

    @classmethod
    async def start(
        cls,
        reaper: Reaper,
        target: BinaryTarget,
        *,
        container_id: str,
        namespace: str,
        stdout_fd: int,
        stderr_fd: int,
    ) -> LoggingBinary:
        """Starts the binary with `stdout_fd`/`stderr_fd` (read ends) as its fds 3 and 4 and
        returns once it is ready (within READY_TIMEOUT); on failure it has been killed and
        reaped."""
        ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(ready_read, False)
        try:
            try:
                pid, exited = spawn(
                    reaper,
                    [target.path, *target.args],
                    fds={3: stdout_fd, 4: stderr_fd, 5: ready_write},
                    env={"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace},
                )
            except OSError as e:
                raise LoggerStartError(f"logging binary {target.path}: {e.strerror}") from e
            finally:
                # Ours closed, so its exit (or close) is EOF on the read end.
                os.close(ready_write)
            logger = cls(target, pid, exited)
            try:
                await logger._wait_ready(ready_read, READY_TIMEOUT)
            except BaseException:
                await logger.stop(timeout=0)
                raise
            return logger
        finally:
            os.close(ready_read)

    async def _wait_ready(self, ready_read: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        signalled: asyncio.Future[bytes] = loop.create_future()

        def read_signal() -> None:
            if not signalled.done():
                signalled.set_result(os.read(ready_read, 1))

        loop.add_reader(ready_read, read_signal)
        try:
            either: set[asyncio.Future[Any]] = {signalled, self.exited}
            done, _ = await asyncio.wait(
                either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            loop.remove_reader(ready_read)
        name = f"logging binary {self.target.path} (pid {self.pid})"
        if not done:
            raise LoggerTimeoutError(f"{name} did not signal ready within {timeout} s")
        if signalled.done() and signalled.result():
            return
        if self.target.ready_required and not self.exited.done():
            raise LoggerStartError(f"{name} closed its ready fd 5 without writing the ready byte")
        if not self.exited.done():
            await asyncio.wait({self.exited}, timeout=_EXIT_GRACE)
        if self.exited.done():
            status = self.exited.result().status
            raise LoggerStartError(f"{name} exited with status {status} before it was ready")

    async def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL if it still runs after `timeout` seconds (default
        STOP_TIMEOUT; 0 kills at once); returns once it has been reaped."""
        if timeout is None:
            timeout = STOP_TIMEOUT
        if self.exited.done():
            return
        # The pid stays ours (no reuse) until the reaper has resolved `exited`.
        if timeout > 0:
            os.kill(self.pid, signal.SIGTERM)
            done, _ = await asyncio.wait({self.exited}, timeout=timeout)
            if done:
                return
            log.warning("%s did not exit %s s after SIGTERM; killing it", self.target.path, timeout)
        os.kill(self.pid, signal.SIGKILL)
        await self.exited
