"""ttrpc framing, sans-IO: pure functions over bytes and a `Connection` that turns received bytes
into events and calls into bytes to send. No sockets, no asyncio (docs PROTOCOL.md E).

A frame is a 10-byte header (data length u32 BE, stream id u32 BE, message type u8, flags u8)
followed by `length` bytes of protobuf. Requests and responses carry the `ttrpc.Request` /
`ttrpc.Response` envelopes; Data frames (streams, ttrpc >= 1.2) carry the raw message.

Behaviour copied from Go ttrpc:
* a frame longer than MAX_MESSAGE_SIZE is read and discarded; that stream gets ProtocolError
  RESOURCE_EXHAUSTED (the server answers it with that status, the client fails that call);
* server side: a Request that does not parse -> INVALID_ARGUMENT "unmarshal request error: ...";
  an even stream id -> INVALID_ARGUMENT (client streams are odd); a stream id that is not larger
  than the last one -> INVALID_ARGUMENT (ttrpc >= 1.2);
* Response frames reaching a server, Request frames reaching a client and unknown message types
  are ignored.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from google.protobuf.message import DecodeError

from shim.api.ttrpc import request_pb2
from shim.ttrpc.errors import Code, TtrpcError

HEADER_LENGTH = 10
MAX_MESSAGE_SIZE = 4 << 20

_HEADER = struct.Struct(">IIBB")
_UINT32_MAX = 0xFFFFFFFF
_parse_request = request_pb2.Request.FromString


class MessageType(enum.IntEnum):
    REQUEST = 0x01
    RESPONSE = 0x02
    DATA = 0x03


class Flags(enum.IntFlag):
    NONE = 0
    REMOTE_CLOSED = 0x01  # Request (non-unary) / Data: the sender sends no more data
    REMOTE_OPEN = 0x02  # Request: the sender will send Data frames on this stream
    NO_DATA = 0x04  # Data: the frame carries no payload


class Header(NamedTuple):
    length: int
    stream_id: int
    message_type: int
    flags: int


def encode_header(length: int, stream_id: int, message_type: int, flags: int = 0) -> bytes:
    return _HEADER.pack(length, stream_id, message_type, flags)


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    """Decode the 10-byte header at `offset` (struct.error if fewer bytes are there)."""
    return Header._make(_HEADER.unpack_from(data, offset))


def oversized_message(length: int, limit: int = MAX_MESSAGE_SIZE) -> str:
    return f"message length {length} exceed maximum message size of {limit}"


# --- protobuf helpers, by hand where that is the fast path --------------------------------------

_SMALL_VARINTS = tuple(bytes((i,)) for i in range(0x80))


def _varint(value: int) -> bytes:
    if value < 0x80:
        if value >= 0:
            return _SMALL_VARINTS[value]
        value &= 0xFFFFFFFFFFFFFFFF  # negative int32/int64: ten-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_bytes(tag: bytes, value: bytes) -> bytes:
    return tag + _varint(len(value)) + value


@functools.lru_cache(maxsize=256)
def _request_prefix(service: str, method: str) -> bytes:
    out = b""
    if service:
        out += _field_bytes(b"\x0a", service.encode())
    if method:
        out += _field_bytes(b"\x12", method.encode())
    return out


def encode_request(
    service: str,
    method: str,
    payload: bytes = b"",
    timeout_nano: int = 0,
    metadata: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Serialize a ttrpc.Request exactly as Go does (fields in order, proto3 defaults omitted)."""
    out = _request_prefix(service, method)
    if payload:
        out += b"\x1a" + _varint(len(payload)) + payload
    if timeout_nano:
        out += b"\x20" + _varint(timeout_nano)
    for key, value in metadata:
        kv = b""
        if key:
            kv += _field_bytes(b"\x0a", key.encode())
        if value:
            kv += _field_bytes(b"\x12", value.encode())
        out += _field_bytes(b"\x2a", kv)
    return out


def encode_status(code: int, message: str = "") -> bytes:
    """Serialize google.rpc.Status{code, message} (no details)."""
    out = b"\x08" + _varint(code) if code else b""
    if message:
        out += _field_bytes(b"\x12", message.encode())
    return out


def encode_response(payload: bytes = b"", code: int = 0, message: str = "") -> bytes:
    """Serialize a ttrpc.Response; like the Go server, status is omitted on success."""
    out = b""
    if code or message:
        out = _field_bytes(b"\x0a", encode_status(code, message))
    if payload:
        out += b"\x12" + _varint(len(payload)) + payload
    return out


def decode_response(data: bytes) -> tuple[int, str, bytes]:
    """(status code, status message, payload) of a serialized ttrpc.Response (DecodeError)."""
    if not data:
        return 0, "", b""
    response = request_pb2.Response.FromString(data)
    status = response.status
    return status.code, status.message, response.payload


# --- frames --------------------------------------------------------------------------------------


def _frame(stream_id: int, message_type: int, flags: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body), stream_id, message_type, flags) + body


def request_frame(
    stream_id: int,
    service: str,
    method: str,
    payload: bytes = b"",
    *,
    timeout_nano: int = 0,
    metadata: Sequence[tuple[str, str]] = (),
    flags: int = 0,
) -> bytes:
    body = encode_request(service, method, payload, timeout_nano, metadata)
    return _frame(stream_id, MessageType.REQUEST, flags, body)


def response_frame(stream_id: int, payload: bytes = b"", code: int = 0, message: str = "") -> bytes:
    return _frame(stream_id, MessageType.RESPONSE, 0, encode_response(payload, code, message))


def data_frame(stream_id: int, data: bytes = b"", flags: int = 0) -> bytes:
    if not data:
        flags |= Flags.NO_DATA
    return _frame(stream_id, MessageType.DATA, flags, data)


# --- events --------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestReceived:
    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: tuple[tuple[str, str], ...]
    flags: int = 0


@dataclass(slots=True)
class ResponseReceived:
    stream_id: int
    code: int  # 0 = OK (status absent)
    message: str
    payload: bytes


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes  # b"" when the frame had Flags.NO_DATA
    flags: int


@dataclass(slots=True)
class ProtocolError:
    """The peer broke the protocol on one stream; the connection itself stays usable.

    A server answers it on `stream_id` with this status (Go does); a client fails that call.
    """

    stream_id: int
    code: Code
    message: str


Event = RequestReceived | ResponseReceived | DataReceived | ProtocolError


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Connection:
    """One end of a ttrpc connection, sans-IO.

    `receive_data(bytes) -> list[Event]` consumes bytes from the peer (any split); the `send_*`
    methods return the bytes of a frame to write. The adapter keeps the transport; this object
    keeps the framing state (partial frame, discarding an oversized one, stream ids).
    """

    __slots__ = (
        "_buffer",
        "_discard",
        "_discard_length",
        "_discard_stream",
        "_last_stream_id",
        "_max",
        "_next_stream_id",
        "role",
    )

    def __init__(self, role: Role, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.role = role
        self._max = max_message_size
        self._buffer = bytearray()
        self._discard = 0  # bytes of an oversized frame still to skip
        self._discard_stream = 0
        self._discard_length = 0
        self._last_stream_id = 0  # server: highest client stream id seen
        self._next_stream_id = 1  # client: odd ids 1, 3, 5, ...

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    # -- receiving --

    def receive_data(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = data[skip:]
            if self._discard:
                return events
            events.append(self._oversized(self._discard_stream, self._discard_length))
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        end = len(view)
        pos = 0
        unpack = _HEADER.unpack_from
        limit = self._max
        while end - pos >= HEADER_LENGTH:
            length, stream_id, message_type, flags = unpack(view, pos)
            start = pos + HEADER_LENGTH
            if length > limit:
                if end - start >= length:
                    pos = start + length
                    events.append(self._oversized(stream_id, length))
                    continue
                self._discard = length - (end - start)
                self._discard_stream = stream_id
                self._discard_length = length
                pos = end
                break
            if end - start < length:
                break
            pos = start + length
            event = self._frame_received(stream_id, message_type, flags, bytes(view[start:pos]))
            if event is not None:
                events.append(event)
        if view is buffer:
            del buffer[:pos]
        elif pos < end:
            buffer += view[pos:]
        return events

    def _oversized(self, stream_id: int, length: int) -> ProtocolError:
        return ProtocolError(
            stream_id, Code.RESOURCE_EXHAUSTED, oversized_message(length, self._max)
        )

    def _frame_received(
        self, stream_id: int, message_type: int, flags: int, body: bytes
    ) -> Event | None:
        if self.role is Role.SERVER:
            if message_type == MessageType.REQUEST:
                return self._request_received(stream_id, flags, body)
        elif message_type == MessageType.RESPONSE:
            try:
                code, message, payload = decode_response(body)
            except DecodeError as exc:
                return ProtocolError(stream_id, Code.UNKNOWN, f"ttrpc: unmarshal response: {exc}")
            return ResponseReceived(stream_id, code, message, payload)
        if message_type == MessageType.DATA:
            return DataReceived(stream_id, b"" if flags & Flags.NO_DATA else body, flags)
        return None  # not for this role (Go 1.1 ignores them), or an unknown type

    def _request_received(self, stream_id: int, flags: int, body: bytes) -> Event:
        try:
            request = _parse_request(body)
        except DecodeError as exc:
            return ProtocolError(
                stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}"
            )
        if not stream_id & 1:
            return ProtocolError(
                stream_id,
                Code.INVALID_ARGUMENT,
                "StreamID must be odd for client initiated streams",
            )
        if stream_id <= self._last_stream_id:
            return ProtocolError(
                stream_id, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
        self._last_stream_id = stream_id
        metadata = tuple((kv.key, kv.value) for kv in request.metadata) if request.metadata else ()
        return RequestReceived(
            stream_id,
            request.service,
            request.method,
            request.payload,
            request.timeout_nano,
            metadata,
            flags,
        )

    # -- sending --

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes = b"",
        *,
        timeout_nano: int = 0,
        metadata: Sequence[tuple[str, str]] = (),
        flags: int = 0,
    ) -> tuple[int, bytes]:
        """Client: open the next stream with a Request; returns (stream id, frame bytes)."""
        if self.role is not Role.CLIENT:
            raise RuntimeError("only a client sends requests")
        body = encode_request(service, method, payload, timeout_nano, metadata)
        if len(body) > self._max:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, oversized_message(len(body), self._max))
        stream_id = self._next_stream_id
        if stream_id > _UINT32_MAX:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, "ttrpc: stream ids exhausted")
        self._next_stream_id = stream_id + 2
        return stream_id, _frame(stream_id, MessageType.REQUEST, flags, body)

    def send_response(
        self, stream_id: int, payload: bytes = b"", *, code: int = 0, message: str = ""
    ) -> bytes:
        """Server: answer a stream. An oversized answer becomes RESOURCE_EXHAUSTED (ttrpc 1.2)."""
        body = encode_response(payload, code, message)
        if len(body) > self._max:
            body = encode_response(
                b"", Code.RESOURCE_EXHAUSTED, oversized_message(len(body), self._max)
            )
        return _frame(stream_id, MessageType.RESPONSE, 0, body)

    def send_data(self, stream_id: int, data: bytes = b"", *, flags: int = 0) -> bytes:
        if len(data) > self._max:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, oversized_message(len(data), self._max))
        return data_frame(stream_id, data, flags)
