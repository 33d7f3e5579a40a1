"""The long-lived shim: serves the Task API until containerd shuts it down.

Runs in the process ``start`` forked (cwd = the bundle) or, for debugging, as
``<shim> -namespace NS -id ID -socket PATH`` in the foreground.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys
import time

from shim.api.task.v2 import shim_pb2 as task_v2
from shim.api.task.v3 import shim_pb2 as task_v3
from shim.flags import Flags
from shim.manager import bind_socket
from shim.runtimes.base import ShimContext
from shim.runtimes.registry import find_runtime, runtime_name_from_binary, runtime_type
from shim.sys.namespaces import enter_private_mounts
from shim.sys.reaper import Reaper
from shim.task.events import EventPublisher
from shim.task.service import TaskService
from shim.ttrpc.server import Server
from shim.ttrpc.service import service_from_descriptor

log = logging.getLogger("shim")

SHUTDOWN_GRACE = 5.0
ABANDONED_AFTER = 30.0  # seconds without any container before the shim exits by itself


_LOGRUS_LEVELS = {"WARNING": "warning", "CRITICAL": "fatal"}  # the others: lower case


class LogfmtFormatter(logging.Formatter):
    """The logrus text format that containerd's own shims write (containerd re-logs it raw)."""

    def __init__(self, runtime_name: str) -> None:
        super().__init__()
        self._runtime = runtime_name

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        level = _LOGRUS_LEVELS.get(record.levelname, record.levelname.lower())
        quoted = message.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return (
            f'time="{stamp}.{int(record.msecs):03d}000000Z" level={level} msg="{quoted}" '
            f"runtime={self._runtime}"
        )


class NonBlockingHandler(logging.Handler):
    """Writes log lines to fd 2 without ever blocking: a containerd that is gone or slow must
    not stall the shim, so a line that does not fit is dropped."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):
            os.write(2, (self.format(record) + "\n").encode(errors="replace"))


def _open_log(runtime_name: str, debug: bool) -> None:
    """Send stderr to the bundle's ``log`` FIFO, which containerd holds open for reading."""
    with contextlib.suppress(OSError):
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.dup2(fd, 2)
        os.close(fd)
    handler = NonBlockingHandler()
    handler.setFormatter(LogfmtFormatter(runtime_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _dump_stacks() -> None:
    """SIGUSR1: thread stacks and every asyncio task's stack into the log, like Go shims."""
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for task in asyncio.all_tasks():
        with contextlib.suppress(Exception):
            task.print_stack(file=sys.stderr)


def serve(flags: Flags, binary: str, sock: socket.socket) -> int:
    name = runtime_name_from_binary(binary)
    runtime_name = runtime_type(name)
    _open_log(runtime_name, flags.debug)
    try:
        runtime_class = find_runtime(name)
        if runtime_class.private_mounts:  # while the daemon has a single thread
            enter_private_mounts()
        asyncio.run(_serve(flags, runtime_class, runtime_name, sock))
    except Exception:
        log.exception("shim failed")
        return 1
    return 0


async def _serve(flags: Flags, runtime_class: type, runtime_name: str, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    reaper = Reaper.install(loop)
    ttrpc_address = os.environ.get("TTRPC_ADDRESS") or flags.address + ".ttrpc"
    publisher = EventPublisher(ttrpc_address, flags.namespace)
    stop = asyncio.Event()
    runtime = runtime_class(ShimContext(flags.namespace, runtime_name, reaper, flags.debug))
    service = TaskService(runtime, publisher, stop.set)
    server = Server()
    for api in (task_v2, task_v3):  # one implementation serves both API versions
        server.register(service_from_descriptor(api.DESCRIPTOR.services_by_name["Task"]), service)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_stacks)
    socket_path = sock.getsockname()
    serving = loop.create_task(server.serve(sock))
    watchdog = loop.create_task(_stop_when_abandoned(service, stop))
    log.debug("serving %s on %s", runtime_name, socket_path)
    await stop.wait()
    log.debug("shutting down")
    watchdog.cancel()
    await server.shutdown(SHUTDOWN_GRACE)
    await serving
    await service.close()
    await publisher.close(SHUTDOWN_GRACE)
    with contextlib.suppress(OSError):
        os.unlink(socket_path)
    reaper.close()


async def _stop_when_abandoned(service: TaskService, stop: asyncio.Event) -> None:
    """A shim that has held no container for a while is of no use: containerd died while the
    Create was in flight and, restarted, will never send the Shutdown. containerd itself sends
    Shutdown right after the last Delete, so this only catches the abandoned ones; should
    containerd still hold a connection, it sees the shim go and runs its usual cleanup."""
    idle = 0.0
    step = ABANDONED_AFTER / 3
    while True:
        await asyncio.sleep(step)
        idle = 0.0 if service.has_containers() else idle + step
        if idle >= ABANDONED_AFTER:
            log.info("no container for %.0f s: exiting", idle)
            stop.set()
            return


def serve_from_socket_flag(flags: Flags, binary: str) -> int:
    """Foreground serve mode: ``-socket PATH`` names where to listen."""
    if not flags.socket:
        print("serve mode needs -socket PATH (containerd runs `start`)", file=sys.stderr)
        return 2
    sock = bind_socket(flags.socket.removeprefix("unix://"))
    if sock is None:
        print(f"a shim already serves {flags.socket}", file=sys.stderr)
        return 1
    return serve(flags, binary, sock)
