"""The stdio of one process in the guest, held by the agent for the host to read and write.

Output is read from the process's pipe (or pty master) into a bounded buffer; a full buffer
stops the reading, so a host that does not read slows the process down and nothing is dropped.
Reads name the stream offset the host has got to: data is dropped only when a later read shows
the host received it, so a reply lost with its connection is simply read again. Writes to
stdin carry their offset too, and bytes the process already got are skipped on a retry.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from shim.api.agent.v1 import agent_pb2 as api
from shim.io.console import set_window_size, type_eof
from shim.io.fifo import make_pipe
from shim.runtimes.base import ProcessStdio
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1 << 20  # bytes buffered per output stream before the process must wait
READ_CHUNK = 64 * 1024
MAX_READ = 1 << 20  # bytes per ReadStream reply (ttrpc frames are at most 4 MiB)


class OutputStream:
    """One output stream (stdout, stderr or a pty's output) buffered for offset reads."""

    def __init__(self, name: str, fd: int, limit: int = OUTPUT_LIMIT) -> None:
        self._loop = asyncio.get_running_loop()
        self.name = name
        self._fd = fd
        self._limit = limit
        self._buffer = bytearray()
        self._base = 0  # the stream offset of _buffer[0]
        self._eof = False
        self._reading = False
        self._changed = asyncio.Event()
        os.set_blocking(fd, False)
        self._resume()

    @property
    def eof(self) -> bool:
        return self._eof

    async def read(self, offset: int, max_bytes: int = 0) -> bytes:
        """The stream from `offset` on, once there is some; b"" at its end."""
        end = self._base + len(self._buffer)
        if not self._base <= offset <= end:
            raise TtrpcError(
                Code.OUT_OF_RANGE,
                f"{self.name}: offset {offset} outside the buffered {self._base}..{end}",
            )
        del self._buffer[: offset - self._base]  # the caller has these
        self._base = offset
        self._resume()
        while not self._buffer and not self._eof:
            self._changed.clear()
            await self._changed.wait()
            if offset != self._base:  # a newer read moved on: this caller is stale
                raise TtrpcError(Code.ABORTED, f"{self.name}: read at {offset} superseded")
        return bytes(self._buffer[: min(max_bytes or MAX_READ, MAX_READ)])

    def close(self) -> None:
        """Ends the stream here (the process is removed); readers get the end of stream."""
        self._pause()
        self._finish()

    def _on_readable(self) -> None:
        room = self._limit - len(self._buffer)
        try:
            chunk = os.read(self._fd, min(room, READ_CHUNK))
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: a pty master whose last slave fd was closed
                log.warning("%s: read failed: %s", self.name, e)
            chunk = b""
        if not chunk:
            self._pause()
            self._finish()
            return
        self._buffer += chunk
        self._changed.set()
        if len(self._buffer) >= self._limit:
            self._pause()  # the host must read first

    def _resume(self) -> None:
        if not self._reading and not self._eof and len(self._buffer) < self._limit:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _finish(self) -> None:
        self._eof = True
        self._changed.set()


class InputStream:
    """The process's stdin: a pipe, or the pty master under a terminal."""

    def __init__(self, name: str, fd: int, *, terminal: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self.name = name
        self._fd: int | None = fd
        self._terminal = terminal
        self._written = 0
        self._lock = asyncio.Lock()  # one write (or close) at a time, in order
        os.set_blocking(fd, False)

    async def write(self, offset: int, data: bytes) -> int:
        """Writes what of `data` the process has not got yet; the stream's length so far."""
        async with self._lock:
            if offset > self._written:
                raise TtrpcError(
                    Code.OUT_OF_RANGE, f"{self.name}: write at {offset}, only {self._written} taken"
                )
            pending = memoryview(data)[self._written - offset :]
            while pending:
                fd = self._open_fd()
                try:
                    written = os.write(fd, pending)
                except BlockingIOError:
                    await self._writable(fd)
                    continue
                except OSError as e:  # EPIPE: the process closed its input
                    raise TtrpcError(Code.FAILED_PRECONDITION, f"{self.name}: {e}") from e
                pending = pending[written:]
                self._written += written
            return self._written

    async def close(self) -> None:
        """The process reads EOF after what was written before (a terminal: ^D typed)."""
        async with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            if not self._terminal:
                os.close(fd)
            elif not type_eof(fd, self.name):
                # Raw mode has no EOF; hanging up would end the output too.
                log.debug("%s: terminal without EOF: input stays open", self.name)

    def discard(self) -> None:
        """Closes the pipe now (the process is removed); a pty master is not ours to close."""
        fd, self._fd = self._fd, None
        if fd is not None and not self._terminal:
            os.close(fd)

    def _open_fd(self) -> int:
        if self._fd is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{self.name} is closed")
        return self._fd

    async def _writable(self, fd: int) -> None:
        ready = self._loop.create_future()
        self._loop.add_writer(fd, ready.set_result, None)
        try:
            await ready
        finally:
            self._loop.remove_writer(fd)


class ProcessStreams:
    """A process's stdio as the agent holds it: pipes (or a pty) and the streams over them."""

    def __init__(self, process_id: str, wanted: api.Stdio) -> None:
        self._process_id = process_id
        self.terminal = wanted.terminal
        self._wanted = wanted
        self._owned: list[int] = []  # closed at close()
        self._runtime_ends: list[int] = []  # the process's ends, closed once it runs
        self.stdin: InputStream | None = None
        self.stdout: OutputStream | None = None
        self.stderr: OutputStream | None = None
        self.console: int | None = None
        self.runtime_stdio = ProcessStdio(None, None, None, wanted.terminal)
        if not wanted.terminal:
            self.runtime_stdio = ProcessStdio(
                self._pipe_stdin() if wanted.stdin else None,
                self._pipe_stdout() if wanted.stdout else None,
                self._pipe_stderr() if wanted.stderr else None,
                terminal=False,
            )

    def _pipe_stdin(self) -> int:
        theirs, ours = make_pipe()
        self._runtime_ends.append(theirs)
        self.stdin = InputStream(f"{self._process_id} stdin", ours, terminal=False)
        return theirs

    def _pipe_stdout(self) -> int:
        self.stdout, theirs = self._pipe_output("stdout")
        return theirs

    def _pipe_stderr(self) -> int:
        self.stderr, theirs = self._pipe_output("stderr")
        return theirs

    def _pipe_output(self, name: str) -> tuple[OutputStream, int]:
        ours, theirs = make_pipe()
        self._owned.append(ours)
        self._runtime_ends.append(theirs)
        return OutputStream(f"{self._process_id} {name}", ours), theirs

    def started(self, console_master: int | None) -> None:
        """The process runs: drop our copies of its ends (so its exit ends our reads) and,
        under a terminal, serve the pty master it brought."""
        for fd in self._runtime_ends:
            os.close(fd)
        self._runtime_ends.clear()
        if console_master is None:
            return
        self._owned.append(console_master)
        self.console = console_master
        if self._wanted.stdout:
            self.stdout = OutputStream(f"{self._process_id} console", console_master)
        if self._wanted.stdin:
            self.stdin = InputStream(f"{self._process_id} console", console_master, terminal=True)

    def resize(self, rows: int, columns: int) -> None:
        if self.console is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{self._process_id} has no terminal")
        set_window_size(self.console, columns, rows)

    def close(self) -> None:
        """Ends every stream and closes every fd (the process is removed)."""
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        if self.stdin is not None:
            self.stdin.discard()
        for fd in self._owned + self._runtime_ends:
            os.close(fd)
        self._owned.clear()
        self._runtime_ends.clear()
