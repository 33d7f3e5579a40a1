"""asyncio ttrpc client: a thin adapter over `wire.Connection`.

Many calls may be in flight on one connection (odd stream ids 1, 3, 5, ...). A per-call timeout
is sent as timeout_nano and fails the call locally with DEADLINE_EXCEEDED; when the connection
ends every pending and later call fails with ConnectionClosed ("ttrpc: closed"), never hangs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from shim.ttrpc import wire
from shim.ttrpc.errors import Code, ConnectionClosed, TtrpcError, code_of

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_Reply = tuple[int, str, bytes]  # (status code, status message, payload)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.wire = wire.Connection(wire.Role.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[_Reply]] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pending = self.pending
        for event in self.wire.receive_data(data):
            if type(event) is wire.ResponseReceived:
                fut = pending.pop(event.stream_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((event.code, event.message, event.payload))
            elif type(event) is wire.ProtocolError:
                fut = pending.pop(event.stream_id, None)
                if fut is not None and not fut.done():
                    fut.set_exception(TtrpcError(event.code, event.message))
            # Data frames: no streaming calls yet.

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail_pending()

    def fail_pending(self) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed())


class Client:
    """A ttrpc client on one unix socket connection."""

    def __init__(self, protocol: _ClientProtocol) -> None:
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 5.0) -> Client:
        """Connect to a unix socket path (a `unix://` prefix, as in shim addresses, is accepted)."""
        if path.startswith("unix://"):
            path = path[len("unix://") :]
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_unix_connection(_ClientProtocol, path)
        return cls(protocol)

    @property
    def closed(self) -> bool:
        return self._protocol.closed

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> M:
        protocol = self._protocol
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise ConnectionClosed()
        timeout_nano = 0
        if timeout is not None:
            timeout_nano = max(int(timeout * 1e9), 1)
        stream_id, frame = protocol.wire.send_request(
            service,
            method,
            request.SerializeToString(),
            timeout_nano=timeout_nano,
            metadata=tuple(metadata.items()) if metadata else (),
        )
        fut: asyncio.Future[_Reply] = self._loop.create_future()
        protocol.pending[stream_id] = fut
        transport.write(frame)
        timer = None
        if timeout is not None:
            timer = self._loop.call_later(timeout, _expire, protocol.pending, stream_id)
        try:
            code, message, payload = await fut
        finally:
            if timer is not None:
                timer.cancel()
            protocol.pending.pop(stream_id, None)
        if code:
            raise TtrpcError(code_of(code), message)
        try:
            return response_type.FromString(payload)
        except DecodeError as exc:
            raise TtrpcError(Code.INTERNAL, f"ttrpc: error unmarshalling response: {exc}") from exc

    async def close(self) -> None:
        protocol = self._protocol
        if protocol.transport is not None:
            protocol.transport.close()
        # connection_lost comes on a later loop iteration; the client is closed from now on.
        protocol.fail_pending()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _expire(pending: dict[int, asyncio.Future[_Reply]], stream_id: int) -> None:
    fut = pending.pop(stream_id, None)
    if fut is not None and not fut.done():
        fut.set_exception(TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded"))
