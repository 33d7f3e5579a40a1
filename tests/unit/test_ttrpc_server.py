"""Our ttrpc server and client talking over real unix sockets."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from shim.api.task.v2 import shim_pb2
from shim.api.task.v3 import shim_pb2 as task_v3
from shim.ttrpc import wire
from shim.ttrpc.client import Client
from shim.ttrpc.errors import Code, ConnectionClosed, TtrpcError
from shim.ttrpc.server import CallContext, Server
from shim.ttrpc.service import Method, Service, service_from_descriptor
from shim.ttrpc.testing import bind_unix, connect_when_ready, serving

REPO = Path(__file__).resolve().parents[2]
TASK = service_from_descriptor(shim_pb2.DESCRIPTOR.services_by_name["Task"])
NAME = TASK.name


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short and world-traversable: sun_path is 108 bytes, and the peer-cred test connects as nobody.
    path = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def address(sock_dir: str) -> str:
    return os.path.join(sock_dir, "s")


def run(main: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    asyncio.run(bounded())


class Task:
    """A small Task implementation whose behaviour the tests steer."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.contexts: list[CallContext] = []
        self.cancelled: list[str] = []

    async def State(self, request: Any, ctx: CallContext) -> Any:
        self.contexts.append(ctx)
        return shim_pb2.StateResponse(id=request.id, bundle="/bundle", pid=42)

    async def Wait(self, request: Any, ctx: CallContext) -> Any:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append("Wait")
            raise
        return shim_pb2.WaitResponse(exit_status=7)

    async def Kill(self, request: Any, ctx: CallContext) -> Any:
        errors: dict[str, BaseException] = {
            "not-found": TtrpcError(Code.NOT_FOUND, "process already finished: not found"),
            "not-implemented": NotImplementedError("kill is not supported"),
            "bare-not-implemented": NotImplementedError(),
            "value": ValueError("boom"),
            "timeout": TimeoutError("own timeout"),
        }
        if request.id in errors:
            raise errors[request.id]
        if request.id == "none":
            return None
        await asyncio.sleep(request.signal / 1000)  # signal = ms to take
        return empty_pb2.Empty()

    async def Pids(self, request: Any, ctx: CallContext) -> Any:
        return shim_pb2.PidsResponse(processes=[{"pid": p} for p in range(int(request.id))])


async def call_state(client: Client, id: str = "c1", **kw: Any) -> Any:
    return await client.call(
        NAME, "State", shim_pb2.StateRequest(id=id), shim_pb2.StateResponse, **kw
    )


async def kill(client: Client, id: str, signal: int = 0, **kw: Any) -> Any:
    return await client.call(
        NAME, "Kill", shim_pb2.KillRequest(id=id, signal=signal), empty_pb2.Empty, **kw
    )


def new_server(impl: object | None = None) -> Server:
    server = Server()
    server.register(TASK, impl if impl is not None else Task())
    return server


# --- calls ---------------------------------------------------------------------------------------


def test_unary_call_and_call_context(address: str) -> None:
    impl = Task()

    async def main() -> None:
        async with serving(new_server(impl), address):
            client = await Client.connect("unix://" + address)
            loop = asyncio.get_running_loop()
            before = loop.time()
            reply = await call_state(client, timeout=2.0, metadata={"k": "v"})
            assert (reply.id, reply.bundle, reply.pid) == ("c1", "/bundle", 42)
            ctx = impl.contexts[-1]
            assert (ctx.service, ctx.method) == (NAME, "State")
            assert dict(ctx.metadata) == {"k": ("v",)}
            assert ctx.deadline is not None and before + 1.5 < ctx.deadline < loop.time() + 2.0
            await call_state(client)
            assert impl.contexts[-1].deadline is None and not impl.contexts[-1].metadata
            await client.close()
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await call_state(client)

    run(main)


def test_a_blocked_call_does_not_hold_up_others(address: str) -> None:
    impl = Task()

    async def main() -> None:
        async with serving(new_server(impl), address):
            client = await Client.connect(address)
            wait = asyncio.create_task(
                client.call(NAME, "Wait", shim_pb2.WaitRequest(id="c1"), shim_pb2.WaitResponse)
            )
            for _ in range(20):
                assert (await call_state(client)).pid == 42
            assert not wait.done()
            impl.release.set()
            assert (await wait).exit_status == 7
            await client.close()

    run(main)


def test_many_concurrent_calls_are_matched_by_stream_id(address: str) -> None:
    async def main() -> None:
        async with serving(new_server(), address):
            client = await Client.connect(address)
            # Later calls finish first; each caller must get its own answer.
            sizes = list(range(50))
            calls = [
                client.call(NAME, "Pids", shim_pb2.PidsRequest(id=str(n)), shim_pb2.PidsResponse)
                for n in sizes
            ] + [kill(client, "x", signal=50 - n) for n in range(50)]
            replies = await asyncio.gather(*calls)
            assert [len(r.processes) for r in replies[:50]] == sizes
            await client.close()

    run(main)


def test_unknown_service_and_method_are_unimplemented(address: str) -> None:
    partial = Service(
        "test.Partial", {"State": TASK.methods["State"], "Gone": TASK.methods["Kill"]}
    )

    async def main() -> None:
        server = new_server()
        server.register(partial, Task())  # has State, lacks Gone
        async with serving(server, address):
            client = await Client.connect(address)
            req = shim_pb2.StateRequest(id="c1")
            cases = [
                ("nope.Service", "State", "service nope.Service"),
                (NAME, "Frobnicate", "method Frobnicate"),
                ("test.Partial", "Gone", "method Gone"),
            ]
            for service, method, message in cases:
                with pytest.raises(TtrpcError) as info:
                    await client.call(service, method, req, shim_pb2.StateResponse)
                assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, message)
            assert (
                await client.call("test.Partial", "State", req, shim_pb2.StateResponse)
            ).pid == 42
            await client.close()

    run(main)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("not-found", Code.NOT_FOUND, "process already finished: not found"),
        ("not-implemented", Code.UNIMPLEMENTED, "kill is not supported"),
        ("bare-not-implemented", Code.UNIMPLEMENTED, "Kill: not implemented"),
        ("value", Code.UNKNOWN, "boom"),
        ("timeout", Code.UNKNOWN, "own timeout"),
        ("none", Code.UNKNOWN, "ttrpc: marshal called with nil"),
    ],
)
def test_handler_errors_become_status_codes(
    address: str, case: str, code: Code, message: str
) -> None:
    async def main() -> None:
        async with serving(new_server(), address):
            client = await Client.connect(address)
            with pytest.raises(TtrpcError) as info:
                await kill(client, case)
            assert (info.value.code, info.value.message, str(info.value)) == (
                code,
                message,
                message,
            )
            assert (await call_state(client)).pid == 42  # the connection is fine
            await client.close()

    run(main)


def test_client_timeout_fails_with_deadline_exceeded(address: str) -> None:
    async def main() -> None:
        async with serving(new_server(), address):
            client = await Client.connect(address)
            started = time.monotonic()
            with pytest.raises(TtrpcError) as info:
                await kill(client, "slow", signal=5000, timeout=0.2)
            assert info.value.code == Code.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2
            await kill(client, "fast", signal=1, timeout=5)
            await client.close()

    run(main)


def test_server_enforces_timeout_nano(address: str) -> None:
    """A peer that sends timeout_nano but does not time out itself (like a slow Go client)."""
    impl = Task()

    async def main() -> None:
        async with serving(new_server(impl), address):
            reader, writer = await asyncio.open_unix_connection(address)
            conn = wire.Connection(wire.Role.CLIENT)
            payload = shim_pb2.WaitRequest(id="c1").SerializeToString()
            _, frame = conn.send_request(NAME, "Wait", payload, timeout_nano=100_000_000)
            writer.write(frame)
            events: list[wire.Event] = []
            while not events:
                events = conn.receive_data(await reader.read(65536))
            assert events == [
                wire.ResponseReceived(1, Code.DEADLINE_EXCEEDED, "context deadline exceeded", b"")
            ]
            assert impl.cancelled == ["Wait"]
            writer.close()

    run(main)


def test_undecodable_payload_is_internal(address: str) -> None:
    async def main() -> None:
        async with serving(new_server(), address):
            reader, writer = await asyncio.open_unix_connection(address)
            conn = wire.Connection(wire.Role.CLIENT)
            writer.write(conn.send_request(NAME, "State", b"\x0a\x05ab")[1])
            [event] = conn.receive_data(await reader.read(65536))
            assert isinstance(event, wire.ResponseReceived) and event.code == Code.INTERNAL
            assert event.message.startswith("ttrpc: error unmarshalling payload: ")
            writer.close()

    run(main)


def test_protocol_errors_are_answered_and_the_connection_stays(address: str) -> None:
    async def main() -> None:
        async with serving(new_server(), address):
            reader, writer = await asyncio.open_unix_connection(address)
            conn = wire.Connection(wire.Role.CLIENT, max_message_size=1 << 30)
            body = wire.encode_request(
                NAME, "State", shim_pb2.StateRequest(id="x").SerializeToString()
            )
            writer.write(wire.encode_header(len(body), 2, wire.MessageType.REQUEST) + body)
            writer.write(wire.encode_header(5 << 20, 5, wire.MessageType.REQUEST) + bytes(5 << 20))
            writer.write(wire.encode_header(3, 7, wire.MessageType.REQUEST) + b"\xff\xff\xff")
            writer.write(wire.data_frame(9, b"ignored"))
            writer.write(wire.encode_header(len(body), 11, wire.MessageType.REQUEST) + body)
            events: list[wire.Event] = []
            while len(events) < 4:
                events += conn.receive_data(await reader.read(65536))
            codes = {e.stream_id: e.code for e in events if isinstance(e, wire.ResponseReceived)}
            assert codes == {
                2: Code.INVALID_ARGUMENT,
                5: Code.RESOURCE_EXHAUSTED,
                7: Code.INVALID_ARGUMENT,
                11: Code.OK,
            }
            writer.close()

    run(main)


# --- connections ---------------------------------------------------------------------------------

CHILD_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from shim.api.task.v2 import shim_pb2
    from shim.ttrpc.server import Server
    from shim.ttrpc.service import service_from_descriptor
    from shim.ttrpc.testing import bind_unix

    class Impl:
        async def Wait(self, request, ctx):
            await asyncio.Event().wait()

    async def main():
        server = Server()
        task = service_from_descriptor(shim_pb2.DESCRIPTOR.services_by_name["Task"])
        server.register(task, Impl())
        await server.serve(bind_unix(sys.argv[1]))

    asyncio.run(main())
    """
)


def test_client_sees_connection_closed_when_the_server_dies_mid_call(address: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SERVER, address],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:

        async def main() -> None:
            client = await connect_when_ready(address)
            calls = [
                asyncio.create_task(
                    client.call(
                        NAME, "Wait", shim_pb2.WaitRequest(id=str(i)), shim_pb2.WaitResponse
                    )
                )
                for i in range(3)
            ]
            await asyncio.sleep(0.3)
            assert not any(c.done() for c in calls)
            child.send_signal(signal.SIGKILL)
            for c in calls:
                with pytest.raises(ConnectionClosed) as info:
                    await c
                assert (info.value.code, str(info.value)) == (Code.UNAVAILABLE, "ttrpc: closed")
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await client.call(NAME, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse)

        run(main)
    finally:
        child.kill()
        child.wait()


def test_close_fails_pending_calls(address: str) -> None:
    async def main() -> None:
        async with serving(new_server(), address, grace=0.1):  # the Wait handler never ends
            client = await Client.connect(address)
            wait = asyncio.create_task(
                client.call(NAME, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse)
            )
            await asyncio.sleep(0.05)
            await client.close()
            with pytest.raises(ConnectionClosed):
                await wait

    run(main)


def test_a_broken_connection_does_not_affect_others(address: str) -> None:
    async def main() -> None:
        async with serving(new_server(), address):
            good = await Client.connect(address)
            wait = asyncio.create_task(
                good.call(NAME, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse, timeout=0.5)
            )
            for payload in [
                b"\x00\x00\x00\x10\x00\x00",
                b"\x00" * 9 + b"\x01" + b"zz",
                b"\xff" * 64,
            ]:
                raw = socket.socket(socket.AF_UNIX)
                raw.connect(address)
                raw.sendall(payload)
                raw.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                raw.close()  # reset mid-frame
                assert (await call_state(good)).pid == 42
            with pytest.raises(TtrpcError) as info:
                await wait
            assert info.value.code == Code.DEADLINE_EXCEEDED  # still served, not closed
            await good.close()

    run(main)


def test_connect_timeout_and_missing_socket(address: str) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            await Client.connect(address)
        sock = bind_unix(address)  # bound but never listening
        try:
            with pytest.raises(ConnectionRefusedError):
                await Client.connect(address, timeout=0.5)
        finally:
            sock.close()

    run(main)


def test_peer_credentials_are_checked(address: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")

    async def main() -> None:
        async with serving(new_server(), address):
            os.chmod(address, 0o777)
            request = wire.request_frame(1, NAME, "State", b"")
            pid = os.fork()
            if pid == 0:  # child: become nobody, connect, expect the server to hang up
                code = 1
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    with socket.socket(socket.AF_UNIX) as s:
                        s.settimeout(5)
                        s.connect(address)
                        try:
                            s.sendall(request)
                            code = 0 if s.recv(100) == b"" else 2
                        except (ConnectionResetError, BrokenPipeError):
                            code = 0  # hung up before the request went out (EPIPE) or after
                finally:
                    os._exit(code)
            loop = asyncio.get_running_loop()
            _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "uid 65534 was served"
            client = await Client.connect(address)  # root (our euid) still is
            assert (await call_state(client)).pid == 42
            await client.close()

    run(main)


def test_allowed_uid_none_accepts_anyone(address: str) -> None:
    async def main() -> None:
        server = Server(allowed_uid=None)
        server.register(TASK, Task())
        async with serving(server, address):
            client = await Client.connect(address)
            assert (await call_state(client)).pid == 42
            await client.close()
        refusing = Server(allowed_uid=os.geteuid() + 1)
        refusing.register(TASK, Task())
        os.unlink(address)
        async with serving(refusing, address):
            client = await Client.connect(address)
            with pytest.raises(ConnectionClosed):
                await call_state(client)

    run(main)


# --- shutdown ------------------------------------------------------------------------------------


def test_shutdown_lets_in_flight_calls_finish(address: str) -> None:
    async def main() -> None:
        server = new_server()
        serve = asyncio.create_task(server.serve(bind_unix(address)))
        await asyncio.sleep(0)
        client = await Client.connect(address)
        slow = asyncio.create_task(kill(client, "slow", signal=300))
        await asyncio.sleep(0.05)
        await server.shutdown(grace=5)
        assert await asyncio.wait_for(slow, 1) == empty_pb2.Empty()  # answered, not cut off
        await asyncio.wait_for(serve, 5)
        with pytest.raises(OSError):
            await Client.connect(address)
        await asyncio.sleep(0.05)
        assert client.closed

    run(main)


def test_shutdown_cancels_calls_after_grace(address: str) -> None:
    impl = Task()

    async def main() -> None:
        server = new_server(impl)
        serve = asyncio.create_task(server.serve(bind_unix(address)))
        await asyncio.sleep(0)
        client = await Client.connect(address)
        wait = asyncio.create_task(
            client.call(NAME, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse)
        )
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await server.shutdown(grace=0.2)
        assert time.monotonic() - started < 2
        await asyncio.wait_for(serve, 5)
        with pytest.raises(ConnectionClosed):
            await wait
        await asyncio.sleep(0)
        assert impl.cancelled == ["Wait"]

    run(main)


def test_shutdown_called_from_a_handler_still_replies(address: str) -> None:
    class Stopping(Task):
        server: Server

        async def Shutdown(self, request: Any, ctx: CallContext) -> Any:
            await self.server.shutdown(grace=2)
            return empty_pb2.Empty()

    async def main() -> None:
        impl = Stopping()
        impl.server = server = new_server(impl)
        serve = asyncio.create_task(server.serve(bind_unix(address)))
        await asyncio.sleep(0)
        client = await Client.connect(address)
        slow = asyncio.create_task(kill(client, "slow", signal=200))
        reply = await client.call(NAME, "Shutdown", shim_pb2.ShutdownRequest(), empty_pb2.Empty)
        assert reply == empty_pb2.Empty()
        assert await asyncio.wait_for(slow, 1) == empty_pb2.Empty()
        await asyncio.wait_for(serve, 5)

    run(main)


# --- registration --------------------------------------------------------------------------------


def test_registration_rules() -> None:
    server = Server()
    server.register(TASK, Task())
    with pytest.raises(ValueError, match="duplicate service"):
        server.register(TASK, Task())

    class Sync:
        def State(self, request: Any, ctx: CallContext) -> Any:
            return None

    with pytest.raises(TypeError, match="async"):
        Server().register(TASK, Sync())


def test_service_from_descriptor() -> None:
    assert TASK.name == "containerd.task.v2.Task"
    assert len(TASK.methods) == 17
    assert TASK.methods["State"] == Method("State", shim_pb2.StateRequest, shim_pb2.StateResponse)
    assert TASK.methods["Kill"].response_type is empty_pb2.Empty
    v3 = service_from_descriptor(task_v3.DESCRIPTOR.services_by_name["Task"])
    assert v3.name == "containerd.task.v3.Task" and v3.methods.keys() == TASK.methods.keys()
