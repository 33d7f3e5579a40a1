"""Helpers for tests that need a live ttrpc server (ours) on a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from shim.ttrpc.client import Client
from shim.ttrpc.server import Server


def bind_unix(path: str) -> socket.socket:
    """A bound (not yet listening) AF_UNIX stream socket, as `start` hands to the daemon."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_when_ready(address: str, deadline: float = 20) -> Client:
    """A client of a server that may not be listening yet (started in another process)."""
    end = time.monotonic() + deadline
    while True:
        try:
            return await Client.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serving(server: Server, path: str, *, grace: float = 1.0) -> AsyncIterator[Server]:
    """Serve on `path` in the running loop for the duration of the block."""
    task = asyncio.create_task(server.serve(bind_unix(path)))
    await asyncio.sleep(0)  # let serve() start listening
    try:
        yield server
    finally:
        await server.shutdown(grace)
        await task


class ServerThread:
    """Run a Server in its own event loop on a background thread (for blocking-socket tests).

    Exceptions that reach that loop's exception handler are collected in `loop_errors`.
    """

    def __init__(self, server: Server, path: str) -> None:
        self.server = server
        self.path = path
        self.loop_errors: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self._thread = threading.Thread(target=self._run, name="ttrpc-server", daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        sock = bind_unix(self.path)
        self._loop.call_soon(self._started.set)
        await self.server.serve(sock)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("ttrpc test server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 1.0) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self._loop).result(30)
            self._thread.join(30)
