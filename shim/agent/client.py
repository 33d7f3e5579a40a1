"""The host's client of the guest agent: one typed call per Agent RPC over our ttrpc client.

`AgentClient.connect` retries until the agent answers Check, on one connection: a virtio-serial
chardev accepts the host before the guest listens, and requests sent early are answered once it
does (stream ids keep increasing on the connection, as the agent's ttrpc requires).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from google.protobuf.empty_pb2 import Empty

from shim.api.agent.v1 import agent_pb2 as api
from shim.ttrpc.client import Client, M
from shim.ttrpc.errors import Code, ConnectionClosed, TtrpcError

SERVICE = "pyshim.agent.v1.Agent"
CHECK_INTERVAL = 0.2  # each Check waits this long for the agent before the next is sent
CONNECT_RETRY = 0.05


class AgentClient:
    def __init__(self, client: Client, instance: str) -> None:
        self._client = client
        self.instance = instance  # the agent's CheckResponse.instance when connected

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 30.0) -> AgentClient:
        """Connect to `path` (the agent's socket, or QEMU's socket of the agent's port) and
        wait until the agent answers; TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        client: Client | None = None
        while loop.time() < deadline:
            try:
                if client is None or client.closed:
                    client = await Client.connect(path, timeout=deadline - loop.time())
                interval = min(CHECK_INTERVAL, max(deadline - loop.time(), 0.001))
                check = await client.call(
                    SERVICE, "Check", api.CheckRequest(), api.CheckResponse, timeout=interval
                )
                return cls(client, check.instance)
            except (OSError, TimeoutError) as exc:  # not there yet, or refusing
                last = exc
                await asyncio.sleep(CONNECT_RETRY)
            except ConnectionClosed as exc:  # e.g. the socket's owner went away: reconnect
                last = exc
                await asyncio.sleep(CONNECT_RETRY)
            except TtrpcError as exc:
                if exc.code is not Code.DEADLINE_EXCEEDED:  # an agent that answers, wrongly
                    assert client is not None
                    await client.close()
                    raise
                last = exc  # nobody reads the port yet: ask again on the same connection
        if client is not None:
            await client.close()
        raise TimeoutError(f"agent at {path} did not answer within {timeout} s: {last}")

    @property
    def closed(self) -> bool:
        return self._client.closed

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self, method: str, request: Any, response_type: type[M], timeout: float | None = None
    ) -> M:
        return await self._client.call(SERVICE, method, request, response_type, timeout=timeout)

    # -- one wrapper per RPC -------------------------------------------------------------------

    async def check(self, timeout: float | None = None) -> api.CheckResponse:
        return await self._call("Check", api.CheckRequest(), api.CheckResponse, timeout)

    async def setup_guest(self, request: api.SetupGuestRequest) -> None:
        await self._call("SetupGuest", request, Empty)

    async def create_container(
        self,
        container_id: str,
        spec: dict[str, Any],
        rootfs: str,
        stdio: api.Stdio,
        checkpoint: str = "",
    ) -> int:
        """The init's guest pid; the container waits for start_container. With `checkpoint`
        (an image's directory in the guest), start_container restores it and the pid is 0."""
        request = api.CreateContainerRequest(
            container_id=container_id,
            spec=json.dumps(spec).encode(),
            rootfs=rootfs,
            stdio=stdio,
            checkpoint=checkpoint,
        )
        return (await self._call("CreateContainer", request, api.ProcessResponse)).pid

    async def start_container(self, container_id: str) -> None:
        await self._call("StartContainer", _container(container_id), Empty)

    async def exec_process(
        self, container_id: str, exec_id: str, process: dict[str, Any], stdio: api.Stdio
    ) -> int:
        request = api.ExecProcessRequest(
            container_id=container_id,
            exec_id=exec_id,
            process=json.dumps(process).encode(),
            stdio=stdio,
        )
        return (await self._call("ExecProcess", request, api.ProcessResponse)).pid

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, *, all: bool = False
    ) -> None:
        request = api.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all
        )
        await self._call("SignalProcess", request, Empty)

    async def wait_process(self, container_id: str, exec_id: str = "") -> api.WaitProcessResponse:
        request = _process(container_id, exec_id)
        return await self._call("WaitProcess", request, api.WaitProcessResponse)

    async def read_stdout(
        self, container_id: str, exec_id: str, offset: int, max_bytes: int = 0
    ) -> bytes:
        """The stream from `offset` (bytes received so far) on; b"" at its end."""
        request = _read(container_id, exec_id, offset, max_bytes)
        return (await self._call("ReadStdout", request, api.ReadStreamResponse)).data

    async def read_stderr(
        self, container_id: str, exec_id: str, offset: int, max_bytes: int = 0
    ) -> bytes:
        request = _read(container_id, exec_id, offset, max_bytes)
        return (await self._call("ReadStderr", request, api.ReadStreamResponse)).data

    async def write_stdin(self, container_id: str, exec_id: str, offset: int, data: bytes) -> int:
        """Writes `data`, which starts at stream offset `offset`; the stream's length so far."""
        request = api.WriteStdinRequest(
            container_id=container_id, exec_id=exec_id, offset=offset, data=data
        )
        return (await self._call("WriteStdin", request, api.WriteStdinResponse)).written

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._call("CloseStdin", _process(container_id, exec_id), Empty)

    async def tty_win_resize(
        self, container_id: str, exec_id: str, *, rows: int, columns: int
    ) -> None:
        request = api.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, columns=columns
        )
        await self._call("TtyWinResize", request, Empty)

    async def pause_container(self, container_id: str) -> None:
        await self._call("PauseContainer", _container(container_id), Empty)

    async def resume_container(self, container_id: str) -> None:
        await self._call("ResumeContainer", _container(container_id), Empty)

    async def stats_container(self, container_id: str) -> Any:
        """A google.protobuf.Any of io.containerd.cgroups.v1/v2 Metrics."""
        request = _container(container_id)
        return (await self._call("StatsContainer", request, api.StatsContainerResponse)).stats

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        request = api.UpdateContainerRequest(
            container_id=container_id, resources=json.dumps(resources).encode()
        )
        await self._call("UpdateContainer", request, Empty)

    async def list_pids(self, container_id: str) -> list[api.ProcessPid]:
        request = _container(container_id)
        return list((await self._call("ListPids", request, api.ListPidsResponse)).processes)

    async def checkpoint_container(
        self, container_id: str, image_path: str, options: Any | None = None, log_path: str = ""
    ) -> None:
        """CRIU's image of the container into `image_path` (a guest directory); `options`: a
        google.protobuf.Any of containerd.runc.v1.CheckpointOptions; CRIU's log copied to
        `log_path` if it fails."""
        request = api.CheckpointContainerRequest(
            container_id=container_id, image_path=image_path, options=options, log_path=log_path
        )
        await self._call("CheckpointContainer", request, Empty)

    async def remove_process(self, container_id: str, exec_id: str) -> None:
        await self._call("RemoveProcess", _process(container_id, exec_id), Empty)

    async def remove_container(self, container_id: str) -> None:
        await self._call("RemoveContainer", _container(container_id), Empty)

    async def wait_oom(self, after: int) -> api.WaitOomResponse:
        """The first OOM event numbered above `after` (0 at first), once there is one."""
        return await self._call("WaitOom", api.WaitOomRequest(after=after), api.WaitOomResponse)

    async def update_interface(self, interface: api.Interface) -> None:
        request = api.UpdateInterfaceRequest(interface=interface)
        await self._call("UpdateInterface", request, Empty)

    async def update_routes(self, mac: str, routes: list[api.Route]) -> None:
        await self._call("UpdateRoutes", api.UpdateRoutesRequest(mac=mac, routes=routes), Empty)


def _container(container_id: str) -> api.ContainerRequest:
    return api.ContainerRequest(container_id=container_id)


def _process(container_id: str, exec_id: str) -> api.ProcessRequest:
    return api.ProcessRequest(container_id=container_id, exec_id=exec_id)


def _read(container_id: str, exec_id: str, offset: int, max_bytes: int) -> api.ReadStreamRequest:
    return api.ReadStreamRequest(
        container_id=container_id, exec_id=exec_id, offset=offset, max_bytes=max_bytes
    )
