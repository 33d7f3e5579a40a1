"""Starting children of the daemon: posix_spawn (or a plain fork, for a child that runs our own
Python code), registered with the reaper before returning.

posix_spawn uses vfork-like cloning, so the (possibly large) Python heap is never copied, and no
Python code runs in the child. The price: no per-child setup such as a parent-death signal, and
argv[0] is looked up in the daemon's own PATH, not in `env`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from shim.sys.fds import close_all_except
from shim.sys.reaper import Exit, Reaper

_READ_CHUNK = 65536

# Python ignores SIGPIPE (and the daemon may ignore more); ignored dispositions survive exec.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass(frozen=True)
class CommandResult:
    status: int
    stdout: bytes
    stderr: bytes


def spawn(
    reaper: Reaper,
    argv: Sequence[str],
    *,
    fds: Mapping[int, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, asyncio.Future[Exit]]:
    """Start a long-lived child; it gets the `fds` (child fd -> our fd) and /dev/null for
    any of 0-2 not given, and inherits nothing else."""
    with _dev_null() as null:
        child_fds = {0: null, 1: null, 2: null, **(fds or {})}
        pid = _start(argv, child_fds, env)
    return pid, reaper.watch(pid)


def fork_call(
    reaper: Reaper, function: Callable[[], int], *, fds: Mapping[int, int]
) -> tuple[int, asyncio.Future[Exit]]:
    """Start a child that runs ``function()`` in a fork of the daemon and exits with its result.

    For a child that needs what the daemon (and the template it came from) already imported:
    no exec, no imports, and those pages stay shared. The child gets the `fds` (child fd ->
    our fd), /dev/null for any of 0-2 not given, none of our other fds, and default handlers
    for the signals the event loop caught; it must never return into the event loop."""
    with _dev_null() as null:
        child_fds = {0: null, 1: null, 2: null, **fds}
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                _become_forked_child(child_fds)
                code = function()
            finally:
                os._exit(code)
    return pid, reaper.watch(pid)


def _become_forked_child(child_fds: Mapping[int, int]) -> None:
    gc.freeze()  # a collection would touch, and so copy, every inherited object
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(signum)):  # a Python handler: the loop's
                signal.signal(signum, signal.SIG_DFL)
    for target, source in _moved_above_targets(child_fds).items():
        os.dup2(source, target)
    close_all_except(child_fds)  # the moved copies too


async def run_command(
    reaper: Reaper,
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    fds: Mapping[int, int] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> CommandResult:
    """Run a helper command to completion. Output on 1/2 is captured unless `fds` maps them;
    stdin is `input`, else fds[0], else /dev/null. On timeout the child is killed and reaped
    and TimeoutError raised; if the caller is cancelled, the child is killed."""
    if input is not None and fds is not None and 0 in fds:
        raise ValueError("run_command: give stdin as input or as fds[0], not both")
    loop = asyncio.get_running_loop()
    child_fds = dict(fds or {})
    with contextlib.ExitStack() as ours:
        # The child's ends of our pipes: closed in the parent right after the spawn.
        childs = ours.enter_context(contextlib.ExitStack())
        stdin: _PipeWriter | None = None
        if input is not None:
            child_fds[0], write_end = os.pipe()
            childs.callback(os.close, child_fds[0])
            stdin = ours.enter_context(_PipeWriter(loop, write_end, input))
        elif 0 not in child_fds:
            child_fds[0] = childs.enter_context(_dev_null())
        captured: dict[int, _PipeReader] = {}
        for target in (1, 2):
            if target not in child_fds:
                read_end, child_fds[target] = os.pipe()
                childs.callback(os.close, child_fds[target])
                captured[target] = ours.enter_context(_PipeReader(loop, read_end))

        pid = _start(argv, child_fds, env)
        exited = reaper.watch(pid)
        childs.close()
        if stdin is not None:
            stdin.start()
        try:
            done, _ = await asyncio.wait({exited}, timeout=timeout)
        except asyncio.CancelledError:
            _kill(pid, exited)
            raise
        if not done:
            _kill(pid, exited)
            await exited
            raise TimeoutError(f"{argv[0]} did not finish within {timeout} s; killed")
        stdout = captured[1].finish() if 1 in captured else b""
        stderr = captured[2].finish() if 2 in captured else b""
        return CommandResult(exited.result().status, stdout, stderr)


def _start(argv: Sequence[str], child_fds: Mapping[int, int], env: Mapping[str, str] | None) -> int:
    actions: list[tuple[int, int] | tuple[int, int, int]] = [
        (os.POSIX_SPAWN_CLOSE, fd) for fd in _stray_inheritable_fds(child_fds)
    ]
    moved = _moved_above_targets(child_fds)
    actions += [(os.POSIX_SPAWN_DUP2, source, target) for target, source in moved.items()]
    try:
        return os.posix_spawnp(
            argv[0],
            list(argv),
            _child_env(env),
            file_actions=actions,
            setsigmask=(),
            setsigdef=_DEFAULT_SIGNALS,
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            errno.ENOENT, f"cannot run {argv[0]!r}: executable not found", argv[0]
        ) from e
    finally:
        for fd in moved.values():
            os.close(fd)


def _moved_above_targets(child_fds: Mapping[int, int]) -> dict[int, int]:
    """Close-on-exec copies of the sources (target -> copy), all above every target: then no
    dup2 into a target overwrites a source still needed, and none is a same-fd dup2 (which
    would keep its close-on-exec flag)."""
    above = max(child_fds) + 1
    moved: dict[int, int] = {}
    try:
        for target, source in child_fds.items():
            moved[target] = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, above)
    except BaseException:
        for fd in moved.values():
            os.close(fd)
        raise
    return moved


def _stray_inheritable_fds(targets: Mapping[int, int]) -> list[int]:
    """Inheritable fds besides the targets. Python opens everything close-on-exec, so these
    were leaked to us by whoever started us (or by a C library); the child must not get them."""
    strays = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in targets:
            continue
        try:
            if os.get_inheritable(fd):
                strays.append(fd)
        except OSError:  # the fd listdir itself used, now closed
            continue
    return strays


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is not None:
        return dict(env)
    # A helper must not notify systemd on the daemon's behalf.
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}


def _kill(pid: int, exited: asyncio.Future[Exit]) -> None:
    # Safe from pid reuse: the pid stays ours until the reaper has resolved `exited`.
    if not exited.done():
        os.kill(pid, signal.SIGKILL)


class _PipeReader:
    """Collects what a child writes to a pipe, reading whenever the loop sees data, so a
    child writing more than a pipe buffer never blocks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._data = bytearray()
        self._open = True
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._read_chunk)

    def __enter__(self) -> _PipeReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()

    def finish(self) -> bytes:
        """Everything written, once the child has exited: what it wrote is in the pipe by
        then, and a grandchild still holding the pipe open must not make us wait for EOF."""
        while self._read_chunk():
            pass
        self._close()
        return bytes(self._data)

    def _read_chunk(self) -> bool:
        """Reads what is there (up to a chunk); False when nothing more is available now."""
        if not self._open:
            return False
        try:
            chunk = os.read(self._fd, _READ_CHUNK)
        except BlockingIOError:
            return False
        if not chunk:
            self._close()
            return False
        self._data += chunk
        return True

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._fd)
            os.close(self._fd)


class _PipeWriter:
    """Feeds `data` to a child's stdin as it reads, then closes it (EOF)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
        self._loop = loop
        self._fd = fd
        self._pending = memoryview(data)
        self._open = True
        os.set_blocking(fd, False)

    def __enter__(self) -> _PipeWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()

    def start(self) -> None:
        self._loop.add_writer(self._fd, self._write_some)

    def _write_some(self) -> None:
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the child exited or closed its stdin; the rest is unwanted
            self._close()
            return
        self._pending = self._pending[written:]
        if not self._pending:
            self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_writer(self._fd)
            os.close(self._fd)


@contextlib.contextmanager
def _dev_null() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
