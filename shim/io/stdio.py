"""ProcessIO: the stdio of one container process, init or exec (PROTOCOL.md H.2-H.5).

Without a terminal the runtime gets pipes, and pumps copy between those pipes and the
client's FIFOs or files; with `binary://` the container's pipes go straight to the logging
binary. With a terminal the runtime gets no stdio; the pty master arrives later
(`attach_console`) and pumps copy between it and the client's stdio.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
from dataclasses import dataclass

from shim.io.console import set_window_size, type_eof
from shim.io.fifo import PIPE_SIZE, is_fifo, make_pipe, open_input_fifo, open_output_fifo
from shim.io.logger import LoggingBinary
from shim.io.pump import Copy, FileCopy, Pump, Splice, Transfer
from shim.io.uri import BinaryTarget, FifoTarget, FileTarget, StdioTarget, parse_stdio
from shim.sys.reaper import Exit, Reaper

log = logging.getLogger(__name__)

# Terminal traffic is interactive: a small buffer is plenty.
_CONSOLE_BUFFER = 64 * 1024


class _Fds:
    """The fds a ProcessIO owns, so that every way out closes each exactly once."""

    def __init__(self) -> None:
        self._open: set[int] = set()

    def own(self, *fds: int) -> None:
        self._open.update(fds)

    def close(self, fd: int | None) -> None:
        if fd in self._open:
            self._open.remove(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in sorted(self._open):
            os.close(fd)
        self._open.clear()


@dataclass
class _Sink:
    """Where output streams are written, and what to close once the last of them ended."""

    fd: int
    closes: tuple[int, ...]
    # Regular files only: splice cannot append, so they are copied through this buffer.
    file_buffer: bytearray | None
    users: int = 0

    def transfer(self, *, from_tty: bool) -> Transfer:
        if self.file_buffer is not None:
            return FileCopy(self.file_buffer)
        return Copy(_CONSOLE_BUFFER) if from_tty else Splice()


class ProcessIO:
    def __init__(self, reaper: Reaper, process_id: str, namespace: str, terminal: bool) -> None:
        self._reaper = reaper
        self._process_id = process_id
        self._namespace = namespace
        self._terminal = terminal
        self._fds = _Fds()
        # The container-side ends given to the runtime as its stdin/stdout/stderr.
        self.runtime_stdio: tuple[int | None, int | None, int | None] = (None, None, None)
        self._stdin_reader: int | None = None
        self._held_stdin_writer: int | None = None
        self._console: int | None = None
        self._console_sink: _Sink | None = None
        self._logger: LoggingBinary | None = None
        self._logger_pipes: tuple[int, ...] = ()
        self._pumps: list[Pump] = []
        self._output_pumps: list[Pump] = []
        self._closed = False

    @classmethod
    async def create(
        cls,
        *,
        reaper: Reaper,
        process_id: str,
        namespace: str,
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        uid: int = 0,
        gid: int = 0,
    ) -> ProcessIO:
        """Opens the client's stdio and, without a terminal, the runtime's pipes (owned by
        uid/gid) with their pumps running. Raises ValueError for a bad stdio string, OSError
        for a FIFO or file that cannot be opened, LoggerStartError for a failed logger."""
        io = cls(reaper, process_id, namespace, terminal)
        try:
            await io._open(stdin, parse_stdio(stdout), parse_stdio(stderr), uid, gid)
        except BaseException:
            await io.close()
            raise
        return io

    async def _open(
        self,
        stdin: str,
        stdout: StdioTarget | None,
        stderr: StdioTarget | None,
        uid: int,
        gid: int,
    ) -> None:
        if self._terminal:
            stderr = None  # a terminal has one output stream; clients send "" for stderr
        if stdin:
            self._stdin_reader, self._held_stdin_writer = open_input_fifo(stdin)
            self._fds.own(self._stdin_reader, self._held_stdin_writer)
        runtime: list[int | None] = [None, None, None]
        if stdin and not self._terminal:
            runtime[0] = self._pipe_stdin()
        logger = _logger_target(stdout, stderr)
        if logger is not None:
            runtime[1], runtime[2] = await self._start_logger(
                logger, stdout is not None, stderr is not None
            )
        elif self._terminal:
            self._console_sink = self._open_sink(stdout, {}) if stdout is not None else None
        else:
            shared: dict[str, _Sink] = {}
            for index, target in ((1, stdout), (2, stderr)):
                if target is not None:
                    runtime[index] = self._pipe_output(index, self._open_sink(target, shared))
        for fd in runtime:
            if fd is not None:
                os.fchown(fd, uid, gid)
        self.runtime_stdio = (runtime[0], runtime[1], runtime[2])

    def _pipe_stdin(self) -> int:
        assert self._stdin_reader is not None
        container_end, ours = make_pipe()
        self._fds.own(container_end, ours)
        os.set_blocking(ours, False)
        pump = Pump("stdin", self._stdin_reader, ours, Splice(), discard_on_error=False)
        pump.done.add_done_callback(lambda _: self._end_stdin(ours))
        self._start(pump)
        return container_end

    def _pipe_output(self, index: int, sink: _Sink) -> int:
        ours, container_end = make_pipe()
        self._fds.own(ours, container_end)
        os.set_blocking(ours, False)
        name = "stdout" if index == 1 else "stderr"
        pump = Pump(name, ours, sink.fd, sink.transfer(from_tty=False), discard_on_error=True)
        self._start_output(pump, sink, closes_source=True)
        return container_end

    def _open_sink(self, target: StdioTarget, shared: dict[str, _Sink]) -> _Sink:
        """The sink for a FIFO or file target; one sink per file, so that stdout and stderr
        of one file share a handle that is closed only after both ended. FIFOs are never
        shared: two pumps cannot both wait for one fd to become writable."""
        assert not isinstance(target, BinaryTarget)
        sink = shared.get(target.path)
        if sink is None:
            sink = self._open_new_sink(target)
            if sink.file_buffer is not None:
                shared[target.path] = sink
        sink.users += 1
        return sink

    def _open_new_sink(self, target: FifoTarget | FileTarget) -> _Sink:
        if isinstance(target, FifoTarget) and is_fifo(target.path):
            writer, held_reader = open_output_fifo(target.path)
            self._fds.own(writer, held_reader)
            return _Sink(writer, (writer, held_reader), None)
        if isinstance(target, FileTarget):
            os.makedirs(os.path.dirname(target.path), mode=0o755, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        else:
            # A bare path naming an existing regular file: the Go shim appends to it too.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(target.path, flags, 0o644)
        self._fds.own(fd)
        return _Sink(fd, (fd,), bytearray(PIPE_SIZE))

    async def _start_logger(
        self, target: BinaryTarget, want_stdout: bool, want_stderr: bool
    ) -> tuple[int | None, int | None]:
        """Starts the logging binary on two fresh pipes; returns the container-side stdout and
        stderr (None for a stream not wanted, or under a terminal)."""
        out_read, out_write = make_pipe()
        self._fds.own(out_read, out_write)
        err_read, err_write = make_pipe()
        self._fds.own(err_read, err_write)
        self._logger = await LoggingBinary.start(
            self._reaper,
            target,
            container_id=self._process_id,
            namespace=self._namespace,
            stdout_fd=out_read,
            stderr_fd=err_read,
        )
        # Our read ends stay open: a dying logger then never gets the container SIGPIPE, and
        # _on_logger_exit drains them.
        self._logger_pipes = (out_read, err_read)
        self._logger.exited.add_done_callback(self._on_logger_exit)
        if self._terminal:
            os.set_blocking(out_write, False)
            self._console_sink = _Sink(out_write, (out_write,), None, users=1)
            self._fds.close(err_write)  # nothing writes stderr under a terminal: EOF on fd 4
            return None, None
        if not want_stdout:
            self._fds.close(out_write)
        if not want_stderr:
            self._fds.close(err_write)
        return (out_write if want_stdout else None), (err_write if want_stderr else None)

    def _on_logger_exit(self, exited: asyncio.Future[Exit]) -> None:
        if self._closed or exited.cancelled():
            return
        if all(_at_eof(fd) for fd in self._logger_pipes):
            log.debug("logging binary of %s exited after its input ended", self._process_id)
            return
        log.warning(
            "logging binary of %s exited with status %d; discarding its output from now on",
            self._process_id,
            exited.result().status,
        )
        dev_null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self._fds.own(dev_null)
        for fd in self._logger_pipes:
            self._start(Pump("logger drain", fd, dev_null, Splice(), discard_on_error=True))

    def attach_console(self, master_fd: int) -> None:
        """Takes ownership of the pty master and starts copying: stdin FIFO -> master,
        master -> stdout. After close() (the process is being torn down) it just closes it."""
        if self._closed:
            os.close(master_fd)
            return
        if not self._terminal or self._console is not None:
            raise RuntimeError(f"process {self._process_id}: no console expected")
        self._fds.own(master_fd)
        os.set_blocking(master_fd, False)
        self._console = master_fd
        sink = self._console_sink
        if sink is not None:
            pump = Pump(
                "console output",
                master_fd,
                sink.fd,
                sink.transfer(from_tty=True),
                discard_on_error=True,
            )
            self._start_output(pump, sink, closes_source=False)
        if self._stdin_reader is not None:
            pump = Pump(
                "console input",
                self._stdin_reader,
                master_fd,
                Copy(_CONSOLE_BUFFER),
                discard_on_error=False,
            )
            pump.done.add_done_callback(lambda _: self._end_stdin(None))
            self._start(pump)

    def _start(self, pump: Pump) -> None:
        self._pumps.append(pump)
        pump.start()

    def _start_output(self, pump: Pump, sink: _Sink, *, closes_source: bool) -> None:
        source = pump.source

        def ended(_: asyncio.Future[None]) -> None:
            if closes_source:
                self._fds.close(source)
            sink.users -= 1
            if sink.users == 0:
                for fd in sink.closes:
                    self._fds.close(fd)

        pump.done.add_done_callback(ended)
        self._output_pumps.append(pump)
        self._start(pump)

    def _end_stdin(self, container_stdin: int | None) -> None:
        """The client's stdin ended (or the container stopped reading it)."""
        self._fds.close(self._stdin_reader)
        self._stdin_reader = None
        if container_stdin is not None:
            self._fds.close(container_stdin)  # the container reads EOF
        elif self._console is not None:
            self._end_console_input(self._console)

    def _end_console_input(self, console: int) -> None:
        # A terminal in raw mode has no EOF: like the Go shim, hang it up.
        if not type_eof(console, self._process_id):
            self._close_console()

    def _close_console(self) -> None:
        for pump in self._pumps:
            if self._console in (pump.source, pump.destination):
                pump.stop()
        self._fds.close(self._console)
        self._console = None

    def close_runtime_ends(self) -> None:
        """Closes our copies of `runtime_stdio` once the runtime has started the process, so
        that the pumps see EOF when the process exits."""
        for fd in self.runtime_stdio:
            self._fds.close(fd)

    def resize(self, width: int, height: int) -> None:
        if self._console is not None:
            set_window_size(self._console, width, height)

    def close_stdin(self) -> None:
        """CloseIO: drops our writer on the stdin FIFO; the container reads EOF once the
        client's writer is closed too."""
        self._fds.close(self._held_stdin_writer)
        self._held_stdin_writer = None

    async def wait_output(self, timeout: float) -> None:
        """Waits until all output is copied (EOF after the process exited), at most `timeout`
        seconds: a background process may hold the output open indefinitely, and its exit
        must still be reported, so a timeout is logged, not raised."""
        pending = {pump.done for pump in self._output_pumps if not pump.done.done()}
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=timeout)
        if still:
            log.warning("output of %s still open %s s after exit", self._process_id, timeout)

    async def close(self) -> None:
        """Stops copying, closes every fd and stops the logging binary (SIGTERM, SIGKILL after
        12 s). What is still queued in the pipes is dropped."""
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.stop()
        self._fds.close_all()
        self._console = None
        if self._logger is not None:
            await self._logger.stop()


def _at_eof(fd: int) -> bool:
    """A pipe read end with no data left and no writer."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller.poll(0) == [(fd, select.POLLHUP)]


def _logger_target(stdout: StdioTarget | None, stderr: StdioTarget | None) -> BinaryTarget | None:
    """The logging binary both streams go to; a binary:// in one stream must be the same
    binary or nothing in the other, since one binary receives both (fds 3 and 4)."""
    binaries = {t for t in (stdout, stderr) if isinstance(t, BinaryTarget)}
    if not binaries:
        return None
    if len(binaries) > 1 or (None not in (stdout, stderr) and stdout != stderr):
        raise ValueError("stdout and stderr must name the same logging binary (or be empty)")
    return binaries.pop()
