"""How the host reaches the agent: connect-until-Check on one connection, the agent serving a
character device (a pty standing in for the virtio-serial port), and OOM event numbering."""

from __future__ import annotations

import asyncio
import os
import socket
import tty
from collections.abc import Awaitable
from pathlib import Path

from shim.agent.channel import serve_device
from shim.agent.client import AgentClient
from shim.agent.oom import OomLog
from shim.agent.service import AgentService
from shim.api.agent.v1 import agent_pb2 as api
from shim.api.runc.options_pb2 import Options
from shim.io.pump import Copy, Pump
from shim.runtimes.base import ShimContext
from shim.runtimes.runc import RuncRuntime
from shim.sys.reaper import Reaper
from shim.ttrpc.server import Server
from shim.ttrpc.service import service_from_descriptor


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro

    asyncio.run(bounded())


def agent_server(state_dir: Path) -> tuple[Server, AgentService]:
    """The Agent service as served, with a runc backend that these tests never run."""
    context = ShimContext("agent", "test", Reaper(asyncio.get_running_loop(), True))
    service = AgentService(RuncRuntime(context), str(state_dir), Options())
    server = Server()
    server.register(service_from_descriptor(api.DESCRIPTOR.services_by_name["Agent"]), service)
    return server, service


def test_a_host_that_connects_before_the_agent_serves_is_answered_later(tmp_path: Path) -> None:
    """Like QEMU's chardev socket, which accepts the host before the guest reads the port:
    the Checks sent early wait unread, and the client keeps asking on the same connection."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server, _ = agent_server(tmp_path)
        path = str(tmp_path / "port.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        connecting = asyncio.ensure_future(AgentClient.connect(path, timeout=15))
        port, _ = await loop.sock_accept(listener)
        await asyncio.sleep(0.5)  # a few Checks go unanswered
        assert not connecting.done()
        serving = asyncio.ensure_future(server.serve_connection(port))
        client = await connecting
        assert client.instance == (await client.check()).instance
        await client.close()
        await serving  # the host's close ends the connection
        listener.close()

    run(main())


def test_the_agent_serves_a_character_device(tmp_path: Path) -> None:
    async def main() -> None:
        server, _ = agent_server(tmp_path)
        master, slave = os.openpty()
        tty.setraw(slave)  # a port carries bytes, not lines
        os.set_blocking(master, False)
        serving = asyncio.ensure_future(serve_device(server, os.ttyname(slave)))
        # The host's end of the "port" (QEMU's chardev socket): a unix socket relayed to the
        # pty master.
        path = str(tmp_path / "port.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        connecting = asyncio.ensure_future(AgentClient.connect(path, timeout=15))
        host, _ = await asyncio.get_running_loop().sock_accept(listener)
        host.setblocking(False)
        relay = [
            Pump("to port", host.fileno(), master, Copy(65536), discard_on_error=False),
            Pump("from port", master, host.fileno(), Copy(65536), discard_on_error=False),
        ]
        for pump in relay:
            pump.start()
        client = await connecting
        for _ in range(3):
            assert (await client.check()).instance == client.instance
        await client.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await server.shutdown(0)
        for pump in relay:
            pump.stop()
        for sock in (host, listener):
            sock.close()
        os.close(master)
        os.close(slave)

    run(main())


def test_oom_events_are_numbered_and_can_be_asked_for_again() -> None:
    async def main() -> None:
        log = OomLog()
        first = asyncio.ensure_future(log.wait(0))
        await asyncio.sleep(0)
        assert not first.done()
        log.record("a")
        log.record("b")
        assert await first == (1, "a")
        assert await log.wait(0) == (1, "a")  # the reply was lost: the same event again
        assert await log.wait(1) == (2, "b")
        assert log.last == 2

    run(main())
