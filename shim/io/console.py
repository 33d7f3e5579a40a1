"""The console socket given to `runc --console-socket` (PROTOCOL.md H.4), and what is done
with the pty master it brings.

runc connects once and sends the pty master as one SCM_RIGHTS fd (the message data is the
terminal's name, which we do not need).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import socket
import struct
import tempfile
import termios

log = logging.getLogger(__name__)

_NAME_MAX = 4096


class ConsoleSocket:
    def __init__(self, directory: str, listener: socket.socket) -> None:
        self._directory = directory
        self._listener = listener
        self.path = os.path.join(directory, "pty.sock")

    @classmethod
    def create(cls) -> ConsoleSocket:
        """A listening `pty.sock` in a fresh private (0700) temp dir."""
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        directory = tempfile.mkdtemp(prefix="pty", dir=base)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(os.path.join(directory, "pty.sock"))
            listener.listen(1)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(directory, listener)

    async def receive_master(self, timeout: float = 10.0) -> int:
        """Accepts one connection and returns the pty master it carries (close-on-exec)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                connection, _ = await loop.sock_accept(self._listener)
                with connection:
                    return await _receive_fd(loop, connection)
        except TimeoutError:
            raise TimeoutError(f"no console received on {self.path} within {timeout} s") from None

    def close(self) -> None:
        self._listener.close()
        shutil.rmtree(self._directory, ignore_errors=True)


async def _receive_fd(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> int:
    while True:
        await _readable(loop, connection.fileno())
        try:
            _, fds, flags, _ = socket.recv_fds(connection, _NAME_MAX, 1, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            continue
        break
    if not fds:
        truncated = " (control data truncated)" if flags & socket.MSG_CTRUNC else ""
        raise ConnectionError(f"console socket peer sent no fd{truncated}")
    master = fds[0]
    if not os.isatty(master):
        os.close(master)
        raise ConnectionError("console socket peer sent an fd that is not a terminal")
    return master


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def set_window_size(master: int, width: int, height: int) -> None:
    """TIOCSWINSZ: `width` columns, `height` rows."""
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def type_eof(master: int, process_id: str) -> bool:
    """Types the terminal's EOF character, as a user pressing ^D would, so that a reading
    process (`cat`) sees EOF and its output still flows; twice, since with a partial line
    pending the first only delivers that line. False when the terminal has no EOF (raw mode)
    or cannot take it: then the caller hangs the terminal up."""
    try:
        attributes = termios.tcgetattr(master)
        if attributes[3] & termios.ICANON:
            os.write(master, attributes[6][termios.VEOF] * 2)
            return True
    except (OSError, termios.error) as e:  # the slave is gone, or the input queue is full
        log.debug("%s: cannot type EOF on the console (%s)", process_id, e)
    return False
