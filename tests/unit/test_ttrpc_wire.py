"""ttrpc framing: golden bytes from Go ttrpc (docs PROTOCOL.md E.7) and two in-memory endpoints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.api.google.rpc import status_pb2
from shim.api.task.v2 import shim_pb2
from shim.api.ttrpc import request_pb2
from shim.ttrpc import wire
from shim.ttrpc.errors import Code, TtrpcError
from shim.ttrpc.wire import (
    Connection,
    DataReceived,
    Flags,
    MessageType,
    ProtocolError,
    RequestReceived,
    ResponseReceived,
    Role,
)

TASK = "containerd.task.v2.Task"

# PROTOCOL.md E.7, as captured from containerd 1.6.20 and its Go shim.
GOLDEN_CONNECT_REQUEST = bytes.fromhex(
    "00000028 00000003 01 00 0a17"
    + b"containerd.task.v2.Task".hex()
    + "1207"
    + b"Connect".hex()
    + "1a04 0a02 7432"
)
GOLDEN_CONNECT_REPLY = bytes.fromhex("00000008 00000003 02 00 1206 08a07c 10e67c")
GOLDEN_NOT_FOUND = bytes.fromhex(
    "00000026 00000003 02 00 0a24 0805 1220" + b"container not created: not found".hex()
)


def frame(stream_id: int, message_type: int, body: bytes, flags: int = 0) -> bytes:
    return wire.encode_header(len(body), stream_id, message_type, flags) + body


def request_body(service: str = TASK, method: str = "Connect", payload: bytes = b"") -> bytes:
    return request_pb2.Request(service=service, method=method, payload=payload).SerializeToString()


# --- golden frames -------------------------------------------------------------------------------


def test_golden_request_is_encoded_exactly() -> None:
    payload = shim_pb2.ConnectRequest(id="t2").SerializeToString()
    assert wire.request_frame(3, TASK, "Connect", payload) == GOLDEN_CONNECT_REQUEST
    client = Connection(Role.CLIENT)
    client.send_request(TASK, "State")  # stream 1
    assert client.send_request(TASK, "Connect", payload) == (3, GOLDEN_CONNECT_REQUEST)


def test_golden_request_is_decoded() -> None:
    [event] = Connection(Role.SERVER).receive_data(GOLDEN_CONNECT_REQUEST)
    assert event == RequestReceived(3, TASK, "Connect", b"\x0a\x02t2", 0, (), 0)
    assert shim_pb2.ConnectRequest.FromString(event.payload).id == "t2"


def test_golden_success_reply_round_trips() -> None:
    payload = shim_pb2.ConnectResponse(shim_pid=15904, task_pid=15974).SerializeToString()
    assert Connection(Role.SERVER).send_response(3, payload) == GOLDEN_CONNECT_REPLY
    [event] = Connection(Role.CLIENT).receive_data(GOLDEN_CONNECT_REPLY)
    assert event == ResponseReceived(3, 0, "", payload)


def test_golden_error_reply_round_trips() -> None:
    message = "container not created: not found"
    reply = Connection(Role.SERVER).send_response(3, code=Code.NOT_FOUND, message=message)
    assert reply == GOLDEN_NOT_FOUND
    [event] = Connection(Role.CLIENT).receive_data(GOLDEN_NOT_FOUND)
    assert event == ResponseReceived(3, Code.NOT_FOUND, message, b"")


def test_empty_success_reply_is_an_empty_frame() -> None:
    assert wire.response_frame(5) == bytes.fromhex("00000000 00000005 02 00")


def test_header_round_trip() -> None:
    header = wire.encode_header(0x01020304, 0xFFFFFFFF, MessageType.DATA, Flags.REMOTE_CLOSED)
    assert header == bytes.fromhex("01020304 ffffffff 03 01")
    assert wire.decode_header(b"xx" + header, 2) == (0x01020304, 0xFFFFFFFF, 3, 1)


# --- hand encoding equals protobuf's -------------------------------------------------------------

keys = st.text(max_size=20)


@given(
    service=st.text(max_size=60),
    method=st.text(max_size=30),
    payload=st.binary(max_size=300),
    timeout_nano=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    metadata=st.lists(st.tuples(keys, keys), max_size=4),
)
def test_request_encoding_matches_protobuf(
    service: str, method: str, payload: bytes, timeout_nano: int, metadata: list[tuple[str, str]]
) -> None:
    expected = request_pb2.Request(
        service=service,
        method=method,
        payload=payload,
        timeout_nano=timeout_nano,
        metadata=[request_pb2.KeyValue(key=k, value=v) for k, v in metadata],
    ).SerializeToString(deterministic=True)
    assert wire.encode_request(service, method, payload, timeout_nano, metadata) == expected


@given(
    payload=st.binary(max_size=300),
    code=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    message=st.text(max_size=200),
)
def test_response_encoding_matches_protobuf(payload: bytes, code: int, message: str) -> None:
    response = request_pb2.Response(payload=payload)
    if code or message:
        response.status.CopyFrom(status_pb2.Status(code=code, message=message))
    assert wire.encode_response(payload, code, message) == response.SerializeToString()
    assert wire.decode_response(wire.encode_response(payload, code, message)) == (
        code,
        message,
        payload,
    )


# --- two endpoints talking -----------------------------------------------------------------------


def test_client_and_server_talk_with_any_split() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid1, f1 = client.send_request(TASK, "State", b"\x0a\x01a", timeout_nano=2_000_000_000)
    sid2, f2 = client.send_request(
        TASK, "Wait", b"", metadata=[("k", "v1"), ("k", "v2"), ("other", "")]
    )
    assert (sid1, sid2) == (1, 3)
    stream = f1 + f2
    events = []
    for i in range(len(stream)):  # one byte at a time
        events += server.receive_data(stream[i : i + 1])
    assert server.buffered == 0
    assert events == [
        RequestReceived(1, TASK, "State", b"\x0a\x01a", 2_000_000_000, (), 0),
        RequestReceived(3, TASK, "Wait", b"", 0, (("k", "v1"), ("k", "v2"), ("other", "")), 0),
    ]
    # replies in any order, both in one chunk
    replies = server.send_response(3, b"\x08\x07") + server.send_response(
        1, code=Code.NOT_FOUND, message="nope"
    )
    assert client.receive_data(replies[:7]) == []
    assert client.receive_data(replies[7:]) == [
        ResponseReceived(3, 0, "", b"\x08\x07"),
        ResponseReceived(1, Code.NOT_FOUND, "nope", b""),
    ]


def test_data_frames_and_flags() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid, request = client.send_request(TASK, "Stream", flags=Flags.REMOTE_OPEN)
    data = client.send_data(sid, b"abc") + client.send_data(sid, flags=Flags.REMOTE_CLOSED)
    assert data[8:10] == bytes([MessageType.DATA, 0])
    assert data[-2:] == bytes([MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA])
    assert server.receive_data(request + data) == [
        RequestReceived(1, TASK, "Stream", b"", 0, (), Flags.REMOTE_OPEN),
        DataReceived(1, b"abc", 0),
        DataReceived(1, b"", Flags.REMOTE_CLOSED | Flags.NO_DATA),
    ]
    # server -> client data on the same stream
    assert client.receive_data(server.send_data(1, b"xy", flags=Flags.REMOTE_CLOSED)) == [
        DataReceived(1, b"xy", Flags.REMOTE_CLOSED)
    ]
    # NO_DATA wins over stray bytes
    assert client.receive_data(frame(1, MessageType.DATA, b"junk", Flags.NO_DATA)) == [
        DataReceived(1, b"", Flags.NO_DATA)
    ]


# --- protocol errors -----------------------------------------------------------------------------


def test_even_stream_id_is_rejected() -> None:
    server = Connection(Role.SERVER)
    [event] = server.receive_data(frame(2, MessageType.REQUEST, request_body()))
    assert event == ProtocolError(
        2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
    )


def test_reused_stream_id_is_rejected() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(5, MessageType.REQUEST, request_body()))
    [event] = server.receive_data(frame(3, MessageType.REQUEST, request_body()))
    assert event == ProtocolError(
        3, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
    )
    [event] = server.receive_data(frame(7, MessageType.REQUEST, request_body()))
    assert isinstance(event, RequestReceived)


def test_unparsable_request_gets_invalid_argument_and_the_stream_goes_on() -> None:
    server = Connection(Role.SERVER)
    events = server.receive_data(
        frame(1, MessageType.REQUEST, b"\xff\xff\xff")
        + frame(3, MessageType.REQUEST, request_body())
    )
    assert isinstance(events[0], ProtocolError)
    assert (events[0].stream_id, events[0].code) == (1, Code.INVALID_ARGUMENT)
    assert events[0].message.startswith("unmarshal request error: ")
    assert isinstance(events[1], RequestReceived) and events[1].stream_id == 3


def test_unparsable_response_fails_that_stream_only() -> None:
    client = Connection(Role.CLIENT)
    events = client.receive_data(
        frame(1, MessageType.RESPONSE, b"\x0a\x05\x08") + frame(3, MessageType.RESPONSE, b"")
    )
    assert isinstance(events[0], ProtocolError) and events[0].stream_id == 1
    assert events[1] == ResponseReceived(3, 0, "", b"")


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 30])
def test_oversized_frame_is_discarded_with_resource_exhausted(chunk: int) -> None:
    server = Connection(Role.SERVER, max_message_size=100)
    stream = frame(1, MessageType.REQUEST, b"\x00" * 101) + frame(
        3, MessageType.REQUEST, request_body()
    )
    events = []
    for i in range(0, len(stream), chunk):
        events += server.receive_data(stream[i : i + chunk])
    assert events[0] == ProtocolError(
        1, Code.RESOURCE_EXHAUSTED, "message length 101 exceed maximum message size of 100"
    )
    assert isinstance(events[1], RequestReceived) and events[1].stream_id == 3
    assert len(events) == 2 and server.buffered == 0


def test_default_limit_is_4_mib() -> None:
    assert wire.MAX_MESSAGE_SIZE == 4 * 1024 * 1024
    server = Connection(Role.SERVER)
    header = wire.encode_header(wire.MAX_MESSAGE_SIZE + 1, 1, MessageType.REQUEST)
    assert server.receive_data(header + b"\x00" * 1000) == []
    assert server.buffered == 0  # discarded, not buffered
    [event] = server.receive_data(b"\x00" * (wire.MAX_MESSAGE_SIZE + 1 - 1000))
    assert isinstance(event, ProtocolError) and event.code == Code.RESOURCE_EXHAUSTED


def test_frames_not_meant_for_the_role_are_ignored() -> None:
    server, client = Connection(Role.SERVER), Connection(Role.CLIENT)
    assert server.receive_data(frame(1, MessageType.RESPONSE, b"") + frame(3, 9, b"x")) == []
    assert (
        client.receive_data(frame(1, MessageType.REQUEST, request_body()) + frame(3, 0, b"")) == []
    )


def test_oversized_reply_becomes_resource_exhausted() -> None:
    server = Connection(Role.SERVER, max_message_size=100)
    [event] = Connection(Role.CLIENT).receive_data(server.send_response(1, b"x" * 200))
    assert isinstance(event, ResponseReceived)
    assert (event.code, event.payload) == (Code.RESOURCE_EXHAUSTED, b"")
    assert event.message == "message length 203 exceed maximum message size of 100"


def test_oversized_request_is_refused_before_sending() -> None:
    client = Connection(Role.CLIENT, max_message_size=100)
    with pytest.raises(TtrpcError) as info:
        client.send_request(TASK, "Create", b"x" * 200)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert client.send_request(TASK, "Create")[0] == 1  # no stream id was used up


def test_roles_are_enforced() -> None:
    with pytest.raises(RuntimeError):
        Connection(Role.SERVER).send_request(TASK, "State")
