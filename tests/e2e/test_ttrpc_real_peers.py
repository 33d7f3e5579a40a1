"""Our ttrpc client against Go ttrpc servers: containerd's runc shim and containerd's own
events service (the path a shim publishes events on)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from google.protobuf import any_pb2, empty_pb2
from harness import GO_RUNTIME, PrivateContainerd

from shim.api.events import task_pb2 as events_pb2
from shim.api.events import ttrpc_pb2 as forward_pb2
from shim.api.task.v2 import shim_pb2
from shim.api.types import task_pb2 as types_pb2
from shim.ttrpc.client import Client
from shim.ttrpc.errors import Code, TtrpcError

TASK = "containerd.task.v2.Task"
EVENTS = "containerd.services.events.ttrpc.v1.Events"

pytestmark = pytest.mark.timeout(120)


def run(main: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    asyncio.run(bounded())


def test_our_client_drives_the_go_shim(containerd: PrivateContainerd) -> None:
    cid = "ttrpc-go"
    containerd.ctr("run", "-d", "--runtime", GO_RUNTIME, containerd.image, cid, "sleep", "1000")
    bundle = containerd.bundle(cid)
    task = TASK
    if (bundle / "bootstrap.json").exists():  # 2.x: its Go shim writes no `address` file
        bootstrap = json.loads((bundle / "bootstrap.json").read_text())
        address = bootstrap["address"]
        task = f"containerd.task.v{bootstrap['version']}.Task"  # 2.x's shim serves only v3
    else:
        address = (bundle / "address").read_text().strip()
    assert address.startswith("unix://")
    [shim_pid] = containerd.shim_pids()

    async def call(client: Client, method: str, request: Any, response_type: Any, **kw: Any) -> Any:
        return await client.call(task, method, request, response_type, **kw)

    async def main() -> None:
        client = await Client.connect(address)
        connected = await call(
            client, "Connect", shim_pb2.ConnectRequest(id=cid), shim_pb2.ConnectResponse
        )
        assert connected.shim_pid == shim_pid and connected.task_pid > 0

        state = await call(
            client, "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse, timeout=2
        )
        assert (state.id, state.pid, state.status) == (cid, connected.task_pid, types_pb2.RUNNING)
        assert state.bundle == str(containerd.bundle(cid))
        assert state.exited_at.seconds == -62135596800  # Go's zero time, always encoded

        pids = await call(client, "Pids", shim_pb2.PidsRequest(id=cid), shim_pb2.PidsResponse)
        assert connected.task_pid in [p.pid for p in pids.processes]

        # Go's error statuses arrive as our codes and messages.
        with pytest.raises(TtrpcError) as info:
            await call(client, "State", shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse)
        assert info.value.code == Code.NOT_FOUND
        with pytest.raises(TtrpcError) as info:
            await call(client, "Frobnicate", shim_pb2.StateRequest(), shim_pb2.StateResponse)
        assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Frobnicate")
        with pytest.raises(TtrpcError) as info:
            await client.call("x.Y", "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
        assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "service x.Y")

        # Many calls in flight on one connection, with a blocked Wait among them.
        wait = asyncio.create_task(
            call(client, "Wait", shim_pb2.WaitRequest(id=cid), shim_pb2.WaitResponse)
        )
        states = await asyncio.gather(
            *(
                call(client, "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse)
                for _ in range(100)
            )
        )
        assert {s.pid for s in states} == {connected.task_pid}
        assert not wait.done()
        await call(
            client, "Kill", shim_pb2.KillRequest(id=cid, signal=signal.SIGKILL), empty_pb2.Empty
        )
        waited = await wait
        assert waited.exit_status == 137 and waited.exited_at.seconds > 0
        await client.close()

    run(main)


def test_our_client_forwards_events_to_containerd(containerd: PrivateContainerd) -> None:
    event = any_pb2.Any(
        type_url="containerd.events.TaskOOM",
        value=events_pb2.TaskOOM(container_id="forwarded-by-pyshim").SerializeToString(),
    )

    async def forward(client: Client, topic: str) -> None:
        envelope = forward_pb2.Envelope(namespace=containerd.namespace, topic=topic, event=event)
        envelope.timestamp.FromNanoseconds(time.time_ns())
        request = forward_pb2.ForwardRequest(envelope=envelope)
        await client.call(EVENTS, "Forward", request, empty_pb2.Empty, timeout=5)

    with containerd.events() as events:

        async def main() -> None:
            client = await Client.connect(containerd.ttrpc_address)
            await forward(client, "/tasks/oom")
            # containerd checks envelopes (a missing timestamp is refused by 1.x only: 2.x
            # reads it as 1970), and a topic in every version.
            with pytest.raises(TtrpcError) as info:
                await forward(client, "tasks/oom")
            assert info.value.code == Code.INVALID_ARGUMENT
            assert "must start with '/'" in info.value.message
            await client.close()

        run(main)
        line = events.wait_for("/tasks/oom")
    assert "forwarded-by-pyshim" in line
