"""The guest agent's stdio: offset reads of bounded output buffers, offset writes to stdin."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from shim.agent.stdio import InputStream, OutputStream, ProcessStreams
from shim.api.agent.v1 import agent_pb2 as api
from shim.ttrpc.errors import Code, TtrpcError


def run(coro: object) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro  # type: ignore[misc]

    asyncio.run(bounded())


def test_reads_by_offset_until_end_of_stream() -> None:
    async def main() -> None:
        read_end, write_end = os.pipe()
        stream = OutputStream("out", read_end)
        os.write(write_end, b"abc")
        assert await stream.read(0) == b"abc"
        assert await stream.read(0) == b"abc"  # not taken until a later offset is asked for
        assert await stream.read(1, max_bytes=1) == b"b"
        later = asyncio.ensure_future(stream.read(3))
        await asyncio.sleep(0.01)
        assert not later.done()  # blocks until there is data
        os.write(write_end, b"de")
        assert await later == b"de"
        os.close(write_end)
        assert await stream.read(5) == b""
        assert stream.eof
        with pytest.raises(TtrpcError) as behind:
            await stream.read(2)  # dropped when the caller asked for 3
        assert behind.value.code == Code.OUT_OF_RANGE
        stream.close()
        os.close(read_end)

    run(main())


def test_a_full_buffer_stops_reading_and_nothing_is_dropped() -> None:
    async def main() -> None:
        read_end, write_end = os.pipe()
        stream = OutputStream("out", read_end, limit=8)
        data = bytes(range(100))
        os.write(write_end, data)
        os.close(write_end)
        await asyncio.sleep(0.01)
        assert await stream.read(0) == data[:8]  # the rest waits in the pipe
        received = b""
        while chunk := await stream.read(len(received)):
            assert len(chunk) <= 8
            received += chunk
        assert received == data
        os.close(read_end)

    run(main())


def test_close_ends_waiting_reads() -> None:
    async def main() -> None:
        read_end, write_end = os.pipe()
        stream = OutputStream("out", read_end)
        waiting = asyncio.ensure_future(stream.read(0))
        await asyncio.sleep(0.01)
        stream.close()
        assert await waiting == b""
        os.close(read_end)
        os.close(write_end)

    run(main())


def test_stdin_writes_skip_what_was_taken_and_wait_for_room() -> None:
    async def main() -> None:
        read_end, write_end = os.pipe()
        stdin = InputStream("in", write_end, terminal=False)
        data = os.urandom(3 << 20)  # more than a pipe holds: the write waits for the reader
        received = bytearray()

        def drain() -> None:
            while chunk := os.read(read_end, 65536):
                received.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        assert await stdin.write(0, data[:100]) == 100
        assert await stdin.write(50, data[50:]) == len(data)  # a retry overlapping the first
        with pytest.raises(TtrpcError) as gap:
            await stdin.write(len(data) + 1, b"x")
        assert gap.value.code == Code.OUT_OF_RANGE
        await stdin.close()
        await asyncio.to_thread(reader.join)
        assert bytes(received) == data
        with pytest.raises(TtrpcError) as closed:
            await stdin.write(len(data), b"x")
        assert closed.value.code == Code.FAILED_PRECONDITION
        os.close(read_end)

    run(main())


def test_process_io_makes_the_pipes_wanted_and_closes_them_all() -> None:
    async def main() -> None:
        before = set(os.listdir("/proc/self/fd"))
        io = ProcessStreams("p", api.Stdio(stdin=True, stderr=True))
        stdin, stdout, stderr = (
            io.runtime_stdio.stdin,
            io.runtime_stdio.stdout,
            io.runtime_stdio.stderr,
        )
        assert stdin is not None and stdout is None and stderr is not None
        assert io.stdin is not None and io.stdout is None and io.stderr is not None
        os.write(stderr, b"err")
        io.started(None)  # the process holds its ends now; ours are closed
        assert await io.stderr.read(0) == b"err"
        assert await io.stderr.read(3) == b""  # no writer left
        with pytest.raises(TtrpcError) as no_tty:
            io.resize(24, 80)
        assert no_tty.value.code == Code.FAILED_PRECONDITION
        io.close()
        assert set(os.listdir("/proc/self/fd")) == before

    run(main())


def test_terminal_output_and_input_share_the_pty_master() -> None:
    async def main() -> None:
        master, slave = os.openpty()
        io = ProcessStreams("t", api.Stdio(stdin=True, stdout=True, terminal=True))
        assert io.runtime_stdio.terminal and io.runtime_stdio.stdout is None
        io.started(master)
        assert io.stdin is not None and io.stdout is not None
        io.resize(40, 100)
        assert os.get_terminal_size(slave) == os.terminal_size((100, 40))
        os.write(slave, b"hi")
        assert await io.stdout.read(0) == b"hi"
        await io.stdin.write(0, b"x\n")
        assert os.read(slave, 10) == b"x\n"
        os.close(slave)
        received = b"hi"
        while chunk := await io.stdout.read(len(received)):  # EIO after the hang-up: the end
            received += chunk
        io.close()

    run(main())
