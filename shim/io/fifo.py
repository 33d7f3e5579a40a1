"""Pipes and the client's FIFOs, opened without ever blocking the event loop.

Every open here puts a reader in place before a writer, so no open of a FIFO waits for the
client (PROTOCOL.md H.2). The fds we keep but never use ("held" ends) are what stop a
disappearing client from giving the container EPIPE on output or EOF on input (H.3, Q.8).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

# Large pipe buffers: fewer wake-ups per byte, and each splice moves up to this much.
PIPE_SIZE = 1 << 20


def grow_pipe(fd: int) -> None:
    """Enlarges the pipe buffer behind `fd`; keeps the default when the kernel's per-user
    pipe budget (fs.pipe-user-pages-soft) is used up, which only costs throughput."""
    with contextlib.suppress(PermissionError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def make_pipe() -> tuple[int, int]:
    """A close-on-exec (read end, write end) pair, both blocking, with a large buffer."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    grow_pipe(write_end)
    return read_end, write_end


def is_fifo(path: str) -> bool:
    return stat.S_ISFIFO(os.stat(path).st_mode)


def open_output_fifo(path: str) -> tuple[int, int]:
    """(non-blocking writer, held reader) of an output FIFO. The held reader is never read:
    it keeps the FIFO open when the client goes away, so the container blocks rather than
    dies, and a client that reopens the FIFO (containerd restart) gets the rest."""
    held_reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        os.close(held_reader)
        raise
    grow_pipe(writer)
    return writer, held_reader


def open_input_fifo(path: str) -> tuple[int, int]:
    """(non-blocking reader, held writer) of the stdin FIFO. The held writer means the reader
    sees EOF only after CloseIO drops it and the client has closed its own writer."""
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # The copy is driven by readiness, which a regular file does not have.
        if not stat.S_ISFIFO(os.fstat(reader).st_mode):
            raise ValueError(f"stdin {path!r} is not a FIFO")
        held_writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        os.close(reader)
        raise
    return reader, held_writer
