"""Random, truncated and oversized frames thrown at a live server on a unix socket.

After every example: nothing escaped into the server's loop, the server hung up once we stopped
sending (no hang), everything it sent back was well-formed, and a fresh connection is served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.api.task.v2 import shim_pb2
from shim.ttrpc import wire
from shim.ttrpc.client import Client
from shim.ttrpc.errors import Code
from shim.ttrpc.server import CallContext, Server
from shim.ttrpc.service import service_from_descriptor
from shim.ttrpc.testing import ServerThread

TASK = service_from_descriptor(shim_pb2.DESCRIPTOR.services_by_name["Task"])
TAIL = 8192  # bytes sent after a frame header, whatever length it claims


class Quick:
    async def State(self, request: Any, ctx: CallContext) -> Any:
        return shim_pb2.StateResponse(id=request.id, pid=1)

    async def Wait(self, request: Any, ctx: CallContext) -> Any:
        await asyncio.sleep(0.01)
        return shim_pb2.WaitResponse()


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[ServerThread, Recorder]]:
    directory = tempfile.mkdtemp(prefix="ttrpc-fuzz-", dir="/tmp")
    server = Server()
    server.register(TASK, Quick())
    recorder = Recorder()
    logging.getLogger("shim.ttrpc").addHandler(recorder)
    try:
        with ServerThread(server, os.path.join(directory, "s")) as thread:
            yield thread, recorder
    finally:
        logging.getLogger("shim.ttrpc").removeHandler(recorder)
        shutil.rmtree(directory, ignore_errors=True)


# --- frame strategies ----------------------------------------------------------------------------

stream_ids = st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1))
types = st.one_of(st.sampled_from(list(wire.MessageType)), st.integers(0, 255))
flags = st.integers(0, 255)


@st.composite
def framed(draw: st.DrawFn, body: st.SearchStrategy[bytes]) -> bytes:
    data = draw(body)
    return wire.encode_header(len(data), draw(stream_ids), draw(types), draw(flags)) + data


requests = st.builds(
    wire.encode_request,
    service=st.sampled_from([TASK.name, "", "nope", TASK.name + "x"]),
    method=st.sampled_from(["State", "Wait", "Kill", "", "Bogus"]),
    payload=st.one_of(
        st.binary(max_size=64),
        st.just(shim_pb2.StateRequest(id="fuzz").SerializeToString()),
    ),
    timeout_nano=st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1)),
    metadata=st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=3),
)
valid_request_frames = st.builds(
    lambda sid, body: wire.encode_header(len(body), sid, 1, 0) + body,
    st.integers(0, 2**32 - 1).map(lambda n: n | 1),
    requests,
)
long_frames = st.builds(  # over the limit, or just longer than what follows
    lambda length, sid, tail: wire.encode_header(length, sid, 1, 0) + tail,
    st.one_of(st.integers(wire.MAX_MESSAGE_SIZE + 1, 2**32 - 1), st.integers(0, 2**32 - 1)),
    stream_ids,
    st.binary(max_size=TAIL),
)
frames = st.one_of(
    st.binary(max_size=200),
    framed(st.binary(max_size=300)),
    framed(requests),
    valid_request_frames,
    long_frames,
)


@st.composite
def byte_streams(draw: st.DrawFn) -> list[bytes]:
    chunks = draw(st.lists(frames, min_size=1, max_size=8))
    data = b"".join(chunks)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # truncated anywhere
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# --- checks --------------------------------------------------------------------------------------


def well_formed_call(path: str) -> None:
    conn = wire.Connection(wire.Role.CLIENT)
    payload = shim_pb2.StateRequest(id="ok").SerializeToString()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(conn.send_request(TASK.name, "State", payload)[1])
        events: list[wire.Event] = []
        while not events:
            data = s.recv(65536)
            assert data, "server hung up on a well-formed call"
            events = conn.receive_data(data)
    [event] = events
    assert isinstance(event, wire.ResponseReceived) and event.code == 0
    assert shim_pb2.StateResponse.FromString(event.payload).id == "ok"


def throw(path: str, chunks: list[bytes]) -> bytes:
    """Send the chunks, half-close, and read everything until the server hangs up."""
    received = bytearray()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            for chunk in chunks:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                pytest.fail("server did not hang up after our EOF")
            if not data:
                break
            received += data
    return bytes(received)


def check_replies(data: bytes) -> None:
    conn = wire.Connection(wire.Role.CLIENT, max_message_size=1 << 30)
    for event in conn.receive_data(data):
        assert isinstance(event, wire.ResponseReceived), event
        assert event.stream_id <= 2**32 - 1
        assert event.code in set(Code)


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=byte_streams())
def test_garbage_never_breaks_the_server(
    live: tuple[ServerThread, Recorder], chunks: list[bytes]
) -> None:
    thread, recorder = live
    check_replies(throw(thread.path, chunks))
    assert not thread.loop_errors
    assert not recorder.records
    well_formed_call(thread.path)


def test_still_serving_our_client_after_fuzzing(live: tuple[ServerThread, Recorder]) -> None:
    thread, recorder = live

    async def main() -> None:
        client = await Client.connect(thread.path)
        reply = await client.call(
            TASK.name, "State", shim_pb2.StateRequest(id="x"), shim_pb2.StateResponse, timeout=5
        )
        assert reply.id == "x"
        await client.close()

    asyncio.run(main())
    assert not thread.loop_errors and not recorder.records


def test_oversized_frame_answer_matches_go(live: tuple[ServerThread, Recorder]) -> None:
    thread, _ = live
    size = wire.MAX_MESSAGE_SIZE + 1
    reply = throw(thread.path, [wire.encode_header(size, 9, 1, 0), bytes(size)])
    [event] = wire.Connection(wire.Role.CLIENT).receive_data(reply)
    assert event == wire.ResponseReceived(
        9,
        Code.RESOURCE_EXHAUSTED,
        f"message length {size} exceed maximum message size of 4194304",
        b"",
    )
    assert struct.unpack(">I", reply[:4])[0] == len(reply) - 10
