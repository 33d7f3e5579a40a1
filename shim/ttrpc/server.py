"""asyncio ttrpc server: a thin adapter over `wire.Connection` (unary calls).

Each connection handles its requests concurrently (one task per call; a blocked Wait does not
hold up State), answers by stream id in completion order, and is never closed by the server
while it is healthy. Only `shutdown` closes connections, each once its in-flight calls are done.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from google.protobuf.message import DecodeError, Message

from shim.ttrpc import wire
from shim.ttrpc.errors import Code, TtrpcError
from shim.ttrpc.service import Service

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred {pid, uid, gid}
_NO_METADATA: Mapping[str, Sequence[str]] = MappingProxyType({})

Handler = Callable[[Any, "CallContext"], Awaitable[Message | None]]


@dataclass(frozen=True, slots=True)
class CallContext:
    service: str
    method: str
    metadata: Mapping[str, Sequence[str]]
    deadline: float | None  # loop.time() at which the caller gives up (from timeout_nano)


class _Default(enum.Enum):
    EUID = enum.auto()


class Server:
    def __init__(self, *, allowed_uid: int | _Default | None = _Default.EUID) -> None:
        """`allowed_uid`: the only peer uid accepted (SO_PEERCRED); default our euid;
        None accepts anyone who can connect."""
        self._allowed_uid = os.geteuid() if allowed_uid is _Default.EUID else allowed_uid
        self._handlers: dict[str, dict[str, tuple[Handler, type[Message]]]] = {}
        self._listeners: list[asyncio.Server] = []
        self._connections: set[_ServerConnection] = set()
        self._stopping = False
        self._stopped = asyncio.Event()

    def register(self, service: Service, implementation: object) -> None:
        """Serve `service` with `implementation`'s `async def <Method>(self, request, ctx)`.

        Methods the implementation lacks answer UNIMPLEMENTED, like unknown methods.
        """
        if service.name in self._handlers:
            raise ValueError(f"duplicate service {service.name} registered")
        methods: dict[str, tuple[Handler, type[Message]]] = {}
        for name, method in service.methods.items():
            fn = getattr(implementation, name, None)
            if fn is None:
                continue
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{service.name}.{name}: handler must be an async function")
            methods[name] = (fn, method.request_type)
        self._handlers[service.name] = methods

    async def serve(self, sock: socket.socket) -> None:
        """Accept connections on a bound AF_UNIX socket until `shutdown` finishes."""
        if self._stopping:
            raise RuntimeError("server is shut down")
        loop = asyncio.get_running_loop()
        listener = await loop.create_unix_server(lambda: _ServerConnection(self), sock=sock)
        self._listeners.append(listener)
        try:
            await self._stopped.wait()
        finally:
            listener.close()
            if not self._stopped.is_set():  # cancelled: drop everything
                self._stopping = True
                for conn in list(self._connections):
                    conn.abort()

    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one already-connected AF_UNIX stream socket until the connection ends (the
        guest agent bridges its virtio-serial port, one long-lived stream, to one)."""
        if self._stopping:
            raise RuntimeError("server is shut down")
        connection = _ServerConnection(self)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: connection, sock)
        await connection.lost

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting; let in-flight calls finish (up to `grace` s, then cancel them);
        close every connection once it is idle.

        May be awaited from a handler: that handler is not waited for, and its connection is
        closed after its reply has been written.
        """
        self._stopping = True
        for listener in self._listeners:
            listener.close()
        current = asyncio.current_task()
        for conn in list(self._connections):
            conn.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            pending = {t for c in self._connections for t in c.tasks if t is not current}
            remaining = deadline - loop.time()
            if not pending or remaining <= 0:
                break
            await asyncio.wait(pending, timeout=remaining)
        for conn in list(self._connections):
            conn.cancel_calls(except_task=current)
        self._stopped.set()

    def _peer_allowed(self, transport: asyncio.BaseTransport) -> bool:
        if self._allowed_uid is None:
            return True
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError as exc:
            log.warning("ttrpc: refusing connection: no peer credentials: %s", exc)
            return False
        if uid != self._allowed_uid:
            log.warning("ttrpc: refusing connection from pid %d uid %d", pid, uid)
            return False
        return True


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._handlers = server._handlers
        self._wire = wire.Connection(wire.Role.SERVER)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self._close_when_idle = False
        self.lost: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._server._stopping or not self._server._peer_allowed(transport):
            transport.abort()
            return
        self._transport = transport
        self._server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # In-flight handlers go on (their replies are dropped): like the Go shim, a call that
        # changes state completes even when its caller went away.
        self._transport = None
        self._server._connections.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        for event in self._wire.receive_data(data):
            if type(event) is wire.RequestReceived:
                self._dispatch(event)
            elif type(event) is wire.ProtocolError:
                log.debug("ttrpc: stream %d: %s", event.stream_id, event.message)
                self._reply(event.stream_id, b"", event.code, event.message)
            # Data frames: no streaming methods are served; ignored like Go ttrpc 1.1.

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        # The peer does not read its replies: stop reading its requests until it does.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # -- calls --

    def _dispatch(self, event: wire.RequestReceived) -> None:
        methods = self._handlers.get(event.service)
        if methods is None:
            self._reply(event.stream_id, b"", Code.UNIMPLEMENTED, f"service {event.service}")
            return
        handler = methods.get(event.method)
        if handler is None:
            self._reply(event.stream_id, b"", Code.UNIMPLEMENTED, f"method {event.method}")
            return
        fn, request_type = handler
        try:
            request = request_type.FromString(event.payload)
        except DecodeError as exc:
            self._reply(
                event.stream_id, b"", Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}"
            )
            return
        metadata = _NO_METADATA
        if event.metadata:
            grouped: dict[str, list[str]] = {}
            for key, value in event.metadata:
                grouped.setdefault(key, []).append(value)
            metadata = MappingProxyType({k: tuple(v) for k, v in grouped.items()})
        deadline = None
        if event.timeout_nano:
            deadline = self._loop.time() + event.timeout_nano / 1e9
        ctx = CallContext(event.service, event.method, metadata, deadline)
        task = self._loop.create_task(self._call(event.stream_id, fn, request, ctx))
        self.tasks.add(task)
        task.add_done_callback(self._call_done)

    async def _call(self, stream_id: int, fn: Handler, request: Message, ctx: CallContext) -> None:
        timeout = None
        try:
            if ctx.deadline is None:
                response = await fn(request, ctx)
            else:
                timeout = asyncio.timeout_at(ctx.deadline)
                async with timeout:
                    response = await fn(request, ctx)
        except TtrpcError as exc:
            self._reply(stream_id, b"", exc.code, exc.message)
        except NotImplementedError as exc:
            self._reply(
                stream_id, b"", Code.UNIMPLEMENTED, str(exc) or f"{ctx.method}: not implemented"
            )
        except TimeoutError as exc:
            if timeout is not None and timeout.expired():
                self._reply(stream_id, b"", Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            else:
                self._unknown(stream_id, ctx, exc)
        except asyncio.CancelledError:
            self._reply(stream_id, b"", Code.CANCELLED, "context canceled")
            raise
        except Exception as exc:
            self._unknown(stream_id, ctx, exc)
        else:
            if response is None:
                self._unknown(stream_id, ctx, TypeError("ttrpc: marshal called with nil"))
            else:
                self._reply(stream_id, response.SerializeToString(), 0, "")

    def _unknown(self, stream_id: int, ctx: CallContext, exc: BaseException) -> None:
        log.error("ttrpc: %s/%s failed", ctx.service, ctx.method, exc_info=exc)
        self._reply(stream_id, b"", Code.UNKNOWN, str(exc) or type(exc).__name__)

    def _reply(self, stream_id: int, payload: bytes, code: int, message: str) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(
                self._wire.send_response(stream_id, payload, code=code, message=message)
            )

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._close_when_idle and not self.tasks:
            self.close()

    # -- shutdown --

    def close_when_idle(self) -> None:
        self._close_when_idle = True
        if not self.tasks:
            self.close()

    def cancel_calls(self, except_task: asyncio.Task[Any] | None) -> None:
        for task in list(self.tasks):
            if task is not except_task:
                task.cancel()
        if except_task not in self.tasks:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # flushes replies already written

    def abort(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self._transport is not None:
            self._transport.abort()
