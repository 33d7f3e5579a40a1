"""The console socket (as runc uses it) and ProcessIO with a terminal."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import stat
import struct
import termios
import tty
from pathlib import Path

import pytest
from test_io_support import make_fifos, open_fds, read_until, run

from shim.io.console import ConsoleSocket
from shim.io.stdio import ProcessIO
from shim.sys.reaper import Reaper

pytestmark = pytest.mark.timeout(30)


def send_console(path: str, master: int) -> None:
    """What runc does: connect and send the master with the terminal's name."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        socket.send_fds(client, [b"/dev/pts/99"], [master])


def test_console_socket_receives_the_master_sent_over_scm_rights() -> None:
    async def body() -> tuple[int, bool, bool]:
        console = ConsoleSocket.create()
        directory = os.path.dirname(console.path)
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        master, slave = os.openpty()
        try:
            send_console(console.path, master)
            received = await console.receive_master(timeout=5)
            same = os.fstat(received).st_rdev == os.fstat(master).st_rdev
            os.close(received)
        finally:
            console.close()
            os.close(master)
            os.close(slave)
        return mode, same, os.path.exists(directory)

    assert asyncio.run(body()) == (0o700, True, False)


def test_console_socket_times_out_without_runc() -> None:
    async def body() -> None:
        console = ConsoleSocket.create()
        try:
            await console.receive_master(timeout=0.2)
        finally:
            console.close()

    with pytest.raises(TimeoutError, match="no console received"):
        asyncio.run(body())


def test_console_socket_rejects_a_peer_without_a_terminal_fd() -> None:
    before = open_fds()

    async def body() -> None:
        console = ConsoleSocket.create()
        read_end, write_end = os.pipe()
        try:
            send_console(console.path, read_end)
            await console.receive_master(timeout=5)
        finally:
            console.close()
            os.close(read_end)
            os.close(write_end)

    with pytest.raises(ConnectionError, match="not a terminal"):
        asyncio.run(body())
    assert open_fds() == before


async def terminal_io(reaper: Reaper, tmp_path: Path) -> tuple[ProcessIO, int, int, int]:
    """A terminal ProcessIO with a pty attached as runc would; returns it, the slave end, and
    the client's stdin writer and stdout reader."""
    stdin, stdout = make_fifos(tmp_path, "stdin", "stdout")
    io = await ProcessIO.create(
        reaper=reaper,
        process_id="c1",
        namespace="default",
        stdin=stdin,
        stdout=stdout,
        stderr="",
        terminal=True,
    )
    assert io.runtime_stdio == (None, None, None)
    master, slave = os.openpty()
    tty.setraw(slave)
    console = ConsoleSocket.create()
    try:
        send_console(console.path, master)
        os.close(master)
        io.attach_console(await console.receive_master(timeout=5))
    finally:
        console.close()
    client_in = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
    client_out = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
    return io, slave, client_in, client_out


def test_terminal_copies_stdin_to_the_console_and_the_console_to_stdout(tmp_path: Path) -> None:
    async def body(reaper: Reaper) -> tuple[bytes, bytes]:
        io, slave, client_in, client_out = await terminal_io(reaper, tmp_path)
        os.write(client_in, b"typed")
        os.set_blocking(slave, False)
        typed = await read_until(slave, b"typed")
        os.write(slave, b"shown")
        shown = await read_until(client_out, b"shown")
        for fd in (slave, client_in, client_out):
            os.close(fd)
        await io.close()
        return typed, shown

    assert run(body) == (b"typed", b"shown")


def test_resize_sets_rows_and_columns_seen_on_the_slave(tmp_path: Path) -> None:
    async def body(reaper: Reaper) -> tuple[int, int]:
        io, slave, client_in, client_out = await terminal_io(reaper, tmp_path)
        io.resize(width=132, height=43)
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
        for fd in (slave, client_in, client_out):
            os.close(fd)
        await io.close()
        io.resize(width=1, height=1)  # no console any more: no-op
        return rows, cols

    assert run(body) == (43, 132)


def test_process_exit_ends_output_and_the_client_sees_eof(tmp_path: Path) -> None:
    async def body(reaper: Reaper) -> bytes:
        io, slave, client_in, client_out = await terminal_io(reaper, tmp_path)
        os.write(slave, b"last words")
        os.close(slave)  # the container's last process exited
        output = await read_until(client_out)
        await io.wait_output(5)
        os.close(client_in)
        os.close(client_out)
        await io.close()
        return output

    assert run(body) == b"last words"


def test_stdin_eof_types_eof_on_a_canonical_terminal_and_output_still_flows(
    tmp_path: Path,
) -> None:
    async def body(reaper: Reaper) -> tuple[bytes, bytes, bytes]:
        io, slave, client_in, client_out = await terminal_io(reaper, tmp_path)
        fresh_master, fresh_slave = os.openpty()  # a new terminal starts in canonical mode
        termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(fresh_slave))
        os.close(fresh_master)
        os.close(fresh_slave)
        os.write(client_in, b"partial")
        io.close_stdin()
        os.close(client_in)
        os.set_blocking(slave, False)
        line = await read_until(slave, b"partial")
        at_eof = await read_until(slave)  # the second EOF character: read() returns 0
        os.write(slave, b"still shown")
        shown = await read_until(client_out, b"still shown")
        os.close(slave)
        await io.wait_output(5)
        os.close(client_out)
        await io.close()
        return line, at_eof, shown

    # The client sees the terminal's echo of what was typed, then the later output.
    assert run(body) == (b"partial", b"", b"partialstill shown")


def test_stdin_eof_hangs_up_a_raw_console(tmp_path: Path) -> None:
    """A terminal in raw mode has no EOF: like the Go shim, the end of stdin closes it."""

    async def body(reaper: Reaper) -> tuple[bytes, str]:
        io, slave, client_in, client_out = await terminal_io(reaper, tmp_path)
        io.close_stdin()
        os.close(client_in)
        output = await read_until(client_out)  # EOF: the console is closed
        await io.wait_output(5)
        os.set_blocking(slave, False)
        try:
            slave_sees = "EOF" if os.read(slave, 1) == b"" else "data"
        except OSError as e:
            slave_sees = errno.errorcode.get(e.errno or 0, str(e))
        os.close(slave)
        os.close(client_out)
        await io.close()
        return output, slave_sees

    output, slave_sees = run(body)
    assert output == b""
    assert slave_sees in ("EIO", "EOF")  # a slave whose master is closed is hung up
