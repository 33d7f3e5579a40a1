"""The copy pump on its own: back-pressure, a failing destination, each transfer."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
import termios

import pytest
from test_io_support import read_until

from shim.io.fifo import make_pipe
from shim.io.pump import Copy, FileCopy, Pump, Splice, Transfer

pytestmark = pytest.mark.timeout(30)


def nonblocking_pipe() -> tuple[int, int]:
    read_end, write_end = make_pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    return read_end, write_end


def fill(fd: int) -> int:
    """Writes into a non-blocking pipe until it is full; returns how much went in."""
    total = 0
    chunk = b"x" * 65536
    while True:
        try:
            total += os.write(fd, chunk)
        except BlockingIOError:
            return total


def queued(fd: int) -> int:
    (count,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))
    return int(count)


@pytest.mark.parametrize("transfer", [Splice(), Copy(4096)], ids=["splice", "copy"])
def test_pump_stops_reading_while_the_destination_is_full(transfer: Transfer) -> None:
    async def body() -> tuple[int, bytes]:
        src_read, src_write = nonblocking_pipe()
        dst_read, dst_write = nonblocking_pipe()
        fill(dst_write)
        pump = Pump("test", src_read, dst_write, transfer, discard_on_error=True)
        pump.start()
        os.write(src_write, b"q" * 65536)
        await asyncio.sleep(0.2)
        left_in_source = queued(src_read)
        os.write(src_write, b"after")
        os.close(src_write)
        drained = await read_until(dst_read, b"after")
        await asyncio.wait_for(pump.done, 5)
        for fd in (src_read, dst_read, dst_write):
            os.close(fd)
        return left_in_source, drained[-65541:]

    left_in_source, tail = asyncio.run(body())
    # While the destination had no room, at most one buffer of Copy left the source.
    assert left_in_source >= 65536 - 4096
    assert tail == b"q" * 65536 + b"after"


@pytest.mark.parametrize("transfer", [Splice(), Copy(4096)], ids=["splice", "copy"])
def test_pump_discards_once_the_destination_reader_is_gone(
    transfer: Transfer, caplog: pytest.LogCaptureFixture
) -> None:
    """EPIPE on the destination: the source is still drained to its end, so its writer never
    blocks on a full pipe, and no exception escapes."""

    async def body() -> None:
        src_read, src_write = nonblocking_pipe()
        dst_read, dst_write = nonblocking_pipe()
        os.close(dst_read)
        pump = Pump("test", src_read, dst_write, transfer, discard_on_error=True)
        pump.start()
        for _ in range(20):  # 20 times a full pipe: would block without the discard
            fill(src_write)
            await asyncio.sleep(0.01)
        os.close(src_write)
        await asyncio.wait_for(pump.done, 5)
        os.close(src_read)
        os.close(dst_write)

    with caplog.at_level(logging.WARNING):
        asyncio.run(body())
    assert [r.levelno for r in caplog.records if r.name == "shim.io.pump"] == [logging.WARNING]


def test_pump_without_discard_ends_when_the_destination_is_gone() -> None:
    async def body() -> bytes:
        src_read, src_write = nonblocking_pipe()
        dst_read, dst_write = nonblocking_pipe()
        os.close(dst_read)  # the container closed its stdin
        pump = Pump("stdin", src_read, dst_write, Splice(), discard_on_error=False)
        pump.start()
        os.write(src_write, b"typed")
        await asyncio.wait_for(pump.done, 5)
        left = os.read(src_read, 100)
        for fd in (src_read, src_write, dst_write):
            os.close(fd)
        return left

    # The pump ended without consuming (splice failed before moving anything).
    assert asyncio.run(body()) == b"typed"


def test_file_copy_appends_each_read_with_one_write(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "log")

    async def body() -> None:
        src_read, src_write = nonblocking_pipe()
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        pump = Pump("file", src_read, out, FileCopy(bytearray(1 << 20)), discard_on_error=True)
        pump.start()
        for i in range(100):
            os.write(src_write, b"line %d\n" % i)
            if i % 10 == 0:
                await asyncio.sleep(0)
        os.close(src_write)
        await asyncio.wait_for(pump.done, 5)
        os.close(src_read)
        os.close(out)

    asyncio.run(body())
    with open(path, "rb") as f:
        assert f.read() == b"".join(b"line %d\n" % i for i in range(100))


def test_stop_unregisters_and_resolves_done() -> None:
    async def body() -> bool:
        src_read, src_write = nonblocking_pipe()
        dst_read, dst_write = nonblocking_pipe()
        pump = Pump("test", src_read, dst_write, Splice(), discard_on_error=True)
        pump.start()
        pump.stop()
        # Closing the fds after stop must be safe: nothing is registered any more.
        for fd in (src_read, src_write, dst_read, dst_write):
            os.close(fd)
        await asyncio.sleep(0.05)
        return pump.done.done()

    assert asyncio.run(body())
