"""Task events to containerd: one ordered queue, one forwarder, retries across restarts.

RPC handlers only enqueue. The forwarder delivers strictly in order: a failing head event is
retried (containerd may be restarting) until it is delivered or too old, so exits are not lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from shim.api.events import task_pb2 as events
from shim.api.events import ttrpc_pb2 as forward
from shim.ttrpc.client import Client
from shim.ttrpc.errors import TtrpcError

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
TOPICS: dict[type[Message], str] = {
    events.TaskCreate: "/tasks/create",
    events.TaskStart: "/tasks/start",
    events.TaskDelete: "/tasks/delete",
    events.TaskExit: "/tasks/exit",
    events.TaskOOM: "/tasks/oom",
    events.TaskExecAdded: "/tasks/exec-added",
    events.TaskExecStarted: "/tasks/exec-started",
    events.TaskPaused: "/tasks/paused",
    events.TaskResumed: "/tasks/resumed",
    events.TaskCheckpointed: "/tasks/checkpointed",
}
FORWARD_TIMEOUT = 5.0
MAX_BACKOFF = 2.0
MAX_EVENT_AGE = 300.0  # long enough to outlive a containerd restart


class Publisher(Protocol):
    """What the Task service needs of a publisher (tests record events instead)."""

    def publish(self, event: Message) -> asyncio.Future[bool]: ...


@dataclass
class _Pending:
    envelope: forward.Envelope
    queued_at: float
    delivered: asyncio.Future[bool] = field(default_factory=asyncio.Future)


class EventPublisher:
    def __init__(self, ttrpc_address: str, namespace: str) -> None:
        self._address = ttrpc_address
        self._namespace = namespace
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._client: Client | None = None
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._forward_all())

    def publish(self, event: Message) -> asyncio.Future[bool]:
        """Queue an event; the future says whether it reached containerd."""
        timestamp = Timestamp()
        timestamp.FromNanoseconds(time.time_ns())
        payload = Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
        envelope = forward.Envelope(
            timestamp=timestamp, namespace=self._namespace, topic=TOPICS[type(event)], event=payload
        )
        pending = _Pending(envelope, time.monotonic())
        if self._closing:
            pending.delivered.set_result(False)
            return pending.delivered
        self._queue.append(pending)
        self._wakeup.set()
        return pending.delivered

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (for at most ``timeout``), then stop."""
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            log.warning("dropping %d undelivered events at shutdown", len(self._queue))
        for pending in self._queue:
            if not pending.delivered.done():
                pending.delivered.set_result(False)
        if self._client is not None:
            await self._client.close()

    async def _forward_all(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            delivered = await self._forward(head)
            self._queue.popleft()
            head.delivered.set_result(delivered)

    async def _forward(self, pending: _Pending) -> bool:
        attempt = 0
        while True:
            try:
                if self._client is None or self._client.closed:
                    self._client = await Client.connect(self._address, timeout=FORWARD_TIMEOUT)
                request = forward.ForwardRequest(envelope=pending.envelope)
                await self._client.call(
                    EVENTS_SERVICE, "Forward", request, Empty, timeout=FORWARD_TIMEOUT
                )
                return True
            except (OSError, TtrpcError, TimeoutError) as exc:
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                age = time.monotonic() - pending.queued_at
                if self._closing or age > MAX_EVENT_AGE:
                    log.error("event %s lost: %s", pending.envelope.topic, exc)
                    return False
                attempt += 1
                log.warning("publish %s failed (try %d): %s", pending.envelope.topic, attempt, exc)
                await asyncio.sleep(min(0.1 * 2**attempt, MAX_BACKOFF))
