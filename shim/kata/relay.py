"""One process's stdio between the Task service and the guest agent.

The service hands a backend the runtime ends of its pipes (or, for a terminal, takes a pty
master from it); the relay copies the agent's ReadStdout / ReadStderr into them and what
comes out of the stdin end into WriteStdin, by stream offset. A terminal is a local pty in
raw mode: the guest's pty does the line discipline, the local one only carries bytes and
sizes (resizes go to the agent as TtyWinResize).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import tty
from collections.abc import Awaitable, Callable

from shim.agent.client import AgentClient
from shim.api.agent.v1 import agent_pb2 as api
from shim.runtimes.base import ProcessStdio
from shim.ttrpc.errors import TtrpcError

log = logging.getLogger(__name__)

_READ_CHUNK = 65536
Reader = Callable[[str, str, int], Awaitable[bytes]]


class ProcessRelay:
    def __init__(
        self, agent: AgentClient, container_id: str, exec_id: str, stdio: ProcessStdio
    ) -> None:
        self._agent = agent
        self._ids = (container_id, exec_id)
        self.console_master: int | None = None
        self._console_ours = False  # the master, until handed out to the Task service
        self._fds: list[int] = []  # ours to close
        self._tasks: list[asyncio.Task[None]] = []
        self._output: list[tuple[Reader, int]] = []
        self._input: int | None = None
        self._input_task: asyncio.Task[None] | None = None
        if stdio.terminal:
            self.console_master, slave = os.openpty()
            self._console_ours = True
            tty.setraw(slave)
            self._own(slave)
            # With a terminal the service writes stdin into the master (it passes no stdin
            # end), so whatever the slave reads is the process's input.
            self._input = slave
            self._output.append((agent.read_stdout, slave))
            self.agent_stdio = api.Stdio(stdin=True, stdout=True, terminal=True)
            return
        # The service closes its copies once the process runs: the relay keeps its own.
        if stdio.stdin is not None:
            self._input = self._own(os.dup(stdio.stdin))
        if stdio.stdout is not None:
            self._output.append((agent.read_stdout, self._own(os.dup(stdio.stdout))))
        if stdio.stderr is not None:
            self._output.append((agent.read_stderr, self._own(os.dup(stdio.stderr))))
        self.agent_stdio = api.Stdio(
            stdin=stdio.stdin is not None,
            stdout=stdio.stdout is not None,
            stderr=stdio.stderr is not None,
        )

    def _own(self, fd: int) -> int:
        os.set_blocking(fd, False)
        self._fds.append(fd)
        return fd

    def hand_out_console(self) -> int | None:
        """The pty master, for the Task service (which closes it) to take."""
        self._console_ours = False
        return self.console_master

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._copy_out(read, fd)) for read, fd in self._output]
        if self._input is not None:
            self._input_task = loop.create_task(self._copy_in(self._input))
            self._tasks.append(self._input_task)

    async def drained(self, timeout: float) -> None:
        """Until the output streams ended (a background process may hold them open)."""
        outputs = self._tasks[: len(self._output)]
        if outputs:
            _, pending = await asyncio.wait(outputs, timeout=timeout)
            if pending:
                log.warning("%s/%s: output still open after the exit", *self._ids)

    async def _copy_out(self, read: Reader, fd: int) -> None:
        offset, writable = 0, True
        try:
            while data := await read(*self._ids, offset):
                offset += len(data)
                if writable:  # else drained, so that the agent's buffer never fills
                    writable = await _write_all(fd, data)
        except (TtrpcError, OSError) as exc:  # removed, or the VM is gone
            log.debug("%s/%s: output ends: %s", *self._ids, exc)
        if fd == self._input and self._input_task is not None:
            # A pty's slave serves input too: while open, the master (the Task service's)
            # never reads EIO, and the exit waits out the drain. The process is gone.
            self._input_task.cancel()
            await asyncio.gather(self._input_task, return_exceptions=True)
        self._close(fd)

    async def _copy_in(self, fd: int) -> None:
        offset = 0
        try:
            while data := await _read_some(fd):
                offset = await self._agent.write_stdin(*self._ids, offset, data)
            await self._agent.close_stdin(*self._ids)
        except TtrpcError as exc:
            log.debug("%s/%s: input ends: %s", *self._ids, exc)

    def _close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            with contextlib.suppress(OSError):
                asyncio.get_running_loop().remove_reader(fd)
                asyncio.get_running_loop().remove_writer(fd)
            os.close(fd)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fd in list(self._fds):
            self._close(fd)
        if self._console_ours and self.console_master is not None:
            self._console_ours = False
            os.close(self.console_master)


async def _read_some(fd: int) -> bytes:
    """The next bytes from `fd`; b"" at its end (a pty whose master is closed: EIO)."""
    while True:
        try:
            return os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            await _ready(fd, reading=True)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


async def _write_all(fd: int, data: bytes) -> bool:
    """False when nobody reads `fd` any more."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _ready(fd, reading=False)
        except (BrokenPipeError, OSError):
            return False
    return True


async def _ready(fd: int, *, reading: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    add, remove = (
        (loop.add_reader, loop.remove_reader) if reading else (loop.add_writer, loop.remove_writer)
    )
    add(fd, ready.set_result, None)
    try:
        await ready
    finally:
        remove(fd)
