"""Helpers for the shim.io tests: an event loop with a reaper, a fake client's FIFOs and a fake
"container" started on a ProcessIO's runtime stdio (this module holds no tests)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from shim.io.stdio import ProcessIO
from shim.sys.reaper import Exit, Reaper
from shim.sys.spawn import spawn

T = TypeVar("T")


def run(body: Callable[[Reaper], Awaitable[T]], timeout: float = 30.0) -> T:
    """Runs `body` on a fresh loop with a reaper installed, failing after `timeout` seconds."""

    async def main() -> T:
        reaper = Reaper.install(asyncio.get_running_loop())
        try:
            return await asyncio.wait_for(body(reaper), timeout)
        finally:
            reaper.close()

    return asyncio.run(main())


def make_fifos(directory: Path, *names: str) -> list[str]:
    paths = [str(directory / name) for name in names]
    for path in paths:
        os.mkfifo(path, 0o700)
    return paths


def start_container(reaper: Reaper, io: ProcessIO, argv: Sequence[str]) -> asyncio.Future[Exit]:
    """Starts `argv` on the runtime stdio, as runc would, then closes our copies."""
    fds = {target: fd for target, fd in enumerate(io.runtime_stdio) if fd is not None}
    _, exited = spawn(reaper, argv, fds=fds)
    io.close_runtime_ends()
    return exited


async def read_until(fd: int, end: bytes = b"") -> bytes:
    """What a non-blocking `fd` gives, read on the loop, until the data ends with `end` or
    (when `end` is empty) until EOF."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    finished: asyncio.Future[None] = loop.create_future()

    def read() -> None:
        while not finished.done():
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            data.extend(chunk)
            if not chunk or (end and data.endswith(end)):
                finished.set_result(None)

    loop.add_reader(fd, read)
    try:
        await finished
    finally:
        loop.remove_reader(fd)
    return bytes(data)


async def read_fifo(path: str) -> bytes:
    """A client reading an output FIFO to EOF (open it only once the shim holds a writer,
    or a non-blocking read sees EOF at once)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return await read_until(fd)
    finally:
        os.close(fd)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}
