"""Copying one stream from a source fd to a destination fd, driven by the event loop.

A pump waits for exactly one side at a time: the source to be readable, or, when the
destination is full, the destination to be writable. It reads nothing while the destination
is full, so a slow reader slows the container down and nothing is buffered without bound.
How bytes move is a `Transfer`, chosen by what the fds are:

- `Splice`: pipe to pipe (our pipes and the client's FIFOs); the kernel moves page references
  and no byte reaches Python.
- `Copy`: read/write through one buffer, for a pty master (splice from a tty only exists on
  recent kernels) and for destinations that may be full.
- `FileCopy`: to a regular file opened O_APPEND, which splice refuses with EINVAL.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import select
from typing import Protocol

from shim.io.fifo import PIPE_SIZE

log = logging.getLogger(__name__)

# Moves per wake-up before yielding to the loop, so one busy stream cannot starve the others.
_BURST = 16


class Wait(enum.Enum):
    SOURCE = enum.auto()
    DESTINATION = enum.auto()


class DestinationError(Exception):
    """Writing to the destination failed (EPIPE, ENOSPC, EIO...); wraps the OSError."""


class Transfer(Protocol):
    def move(self, src: int, dst: int) -> int | Wait:
        """Moves some bytes: how many (> 0), 0 at the end of the input, or which side to
        wait for. Raises DestinationError when the destination fails."""
        ...


class Splice:
    def move(self, src: int, dst: int) -> int | Wait:
        try:
            return os.splice(src, dst, PIPE_SIZE, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            # EAGAIN means an empty source or a full destination; ask which.
            return Wait.DESTINATION if _is_full(dst) else Wait.SOURCE
        except OSError as e:
            # The source is always one of our pipes, which has no failure of its own.
            raise DestinationError(e) from e


class Copy:
    def __init__(self, size: int) -> None:
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    def move(self, src: int, dst: int) -> int | Wait:
        if self._start == self._end:
            got = _read_into(src, self._buffer)
            if isinstance(got, Wait) or got == 0:
                return got
            self._start, self._end = 0, got
        try:
            written = os.write(dst, self._view[self._start : self._end])
        except BlockingIOError:
            return Wait.DESTINATION
        except OSError as e:
            raise DestinationError(e) from e
        self._start += written
        return written


class FileCopy:
    """Each move reads all that is queued (the buffer is at least the pipe size) and appends
    it with one write, so streams sharing a file interleave only where the container's own
    writes began and ended; a line written at once is never torn. Writes to a regular file
    complete before `move` returns, which is why streams of one file may share the buffer."""

    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer
        self._view = memoryview(buffer)

    def move(self, src: int, dst: int) -> int | Wait:
        got = _read_into(src, self._buffer)
        if isinstance(got, Wait) or got == 0:
            return got
        pending = self._view[:got]
        try:
            while pending:
                pending = pending[os.write(dst, pending) :]
        except OSError as e:
            raise DestinationError(e) from e
        return got


def _read_into(src: int, buffer: bytearray) -> int | Wait:
    try:
        return os.readv(src, [buffer])
    except BlockingIOError:
        return Wait.SOURCE
    except OSError as e:
        if e.errno == errno.EIO:  # a pty master once the last slave fd is closed
            return 0
        raise


def _is_full(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return not poller.poll(0)


class Pump:
    """Copies `src` to `dst` until the end of `src`, then resolves `done`; never closes
    either fd (their owner does, after `done` or `stop`).

    When the destination fails, a pump with `discard_on_error` keeps draining the source into
    /dev/null, so the writer (the container) neither blocks forever nor gets EPIPE; without
    it (stdin: the container closed its input) the pump ends.
    """

    def __init__(
        self,
        name: str,
        src: int,
        dst: int,
        transfer: Transfer,
        *,
        discard_on_error: bool,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.name = name
        self._src = src
        self._dst = dst
        self._transfer = transfer
        self._discard_on_error = discard_on_error
        self._watching: tuple[Wait, int] | None = None
        self._dev_null: int | None = None
        self.done: asyncio.Future[None] = self._loop.create_future()

    @property
    def source(self) -> int:
        return self._src

    @property
    def destination(self) -> int:
        """The destination fd (/dev/null once discarding)."""
        return self._dst

    def start(self) -> None:
        self._watch(Wait.SOURCE)

    def stop(self) -> None:
        """Ends the copy now; what is still queued in `src` stays there."""
        self._finish()

    def _run(self) -> None:
        try:
            for _ in range(_BURST):
                moved = self._transfer.move(self._src, self._dst)
                if isinstance(moved, Wait):
                    self._watch(moved)
                    return
                if moved == 0:
                    self._finish()
                    return
        except DestinationError as e:
            self._on_destination_error(e)
        except Exception:
            # A callback that raises stays registered and would spin; end this stream only.
            log.exception("stdio %s: copy failed", self.name)
            self._finish()

    def _on_destination_error(self, error: DestinationError) -> None:
        if not self._discard_on_error:
            log.debug("stdio %s: destination closed (%s); copy ends", self.name, error)
            self._finish()
            return
        log.warning("stdio %s: writing failed (%s); discarding this stream", self.name, error)
        self._dev_null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self._dst = self._dev_null
        self._watch(Wait.SOURCE)

    def _watch(self, side: Wait) -> None:
        fd = self._src if side is Wait.SOURCE else self._dst
        if self._watching == (side, fd):
            return
        self._unwatch()
        if side is Wait.SOURCE:
            self._loop.add_reader(fd, self._run)
        else:
            self._loop.add_writer(fd, self._run)
        self._watching = (side, fd)

    def _unwatch(self) -> None:
        if self._watching is None:
            return
        side, fd = self._watching
        if side is Wait.SOURCE:
            self._loop.remove_reader(fd)
        else:
            self._loop.remove_writer(fd)
        self._watching = None

    def _finish(self) -> None:
        self._unwatch()
        if self._dev_null is not None:
            os.close(self._dev_null)
            self._dev_null = None
        if not self.done.done():
            self.done.set_result(None)
