"""A warmed template process that does every ``start`` and ``delete`` of one containerd.

A fresh CPython that imports asyncio, protobuf and our modules spends ~100 ms before it can
answer Create and holds ~20 MB of private memory per shim. So the first ``start`` of a
containerd spawns a template that imports the daemon once and freezes those objects
(``gc.freeze``). Each ``start`` or ``delete`` then only relays its argv, environment and stdio
(shim.relay); the template forks a child that does the command, and after ``start`` that child
stays on as the shim daemon: it serves at once and shares the template's pages copy-on-write.

Lifetime: the template runs in a session of its own (not containerd's child) and serves one
containerd address and one shim program. It exits once it has had no child for the idle time
(PYSHIM_TEMPLATE_IDLE seconds in the environment containerd gives its shims; IDLE_DEFAULT
unset), and at once when the process that ran the first shim (containerd) is gone. Daemons are
independent of it: if it exits they are reparented like any orphan. The template names itself
TEMPLATE_COMM (/proc/PID/comm) so tools can tell it from a shim.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import select
import socket
import sys
import time
import traceback
from collections.abc import Callable

from shim.flags import Flags, parse_flags
from shim.manager import bind_socket, delete, detach, null_stdio, start
from shim.relay import MESSAGE_MAX, REPLY_TIMEOUT, STDIO, decode_request, encode_reply
from shim.sys.cmdline import set_cmdline, set_comm
from shim.sys.fds import close_all_except

TEMPLATE_COMM = "pyshim-template"
IDLE_ENV = "PYSHIM_TEMPLATE_IDLE"
# Seconds without a child before the template exits: a node that runs a container every few
# minutes (CronJobs, CI) keeps its template warm; the cost is one idle template's memory for
# ten minutes after the last container (docs/ARCHITECTURE.md has the figures).
IDLE_DEFAULT = 600.0
REAP_INTERVAL = 1.0  # how often the exits of children are looked for while any runs


def idle_time() -> float:
    """PYSHIM_TEMPLATE_IDLE, or IDLE_DEFAULT when it is unset or not a number >= 0."""
    try:
        seconds = float(os.environ.get(IDLE_ENV, ""))
    except ValueError:
        return IDLE_DEFAULT
    return seconds if 0 <= seconds < float("inf") else IDLE_DEFAULT


def spawn_template(path: str, program: str, containerd_address: str) -> None:
    """Bind the template socket here (so a concurrent request finds it) and fork the template;
    nothing to do when a live template already listens there."""
    listener = bind_socket(path, socket.SOCK_SEQPACKET)
    if listener is None:
        return
    identity = os.stat(path).st_ino
    containerd = os.pidfd_open(os.getppid())  # containerd runs the shims: it is our parent
    if os.fork() == 0:
        code = 1
        try:
            detach()
            # Keep only these: an inherited fd such as the first daemon's shim socket would
            # keep that socket connectable (a hang, not a refusal) after the daemon died.
            close_all_except([0, 1, 2, listener.fileno(), containerd])
            code = _serve_template(listener, identity, program, containerd_address, containerd)
        finally:
            _unlink_if_ours(path, identity)  # also when the imports failed
            os._exit(code)
    listener.close()
    os.close(containerd)


def _unlink_if_ours(path: str, identity: int) -> None:
    """Remove the template socket unless a newer template has bound the path since."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == identity:
            os.unlink(path)


def _serve_template(
    listener: socket.socket, identity: int, program: str, containerd_address: str, containerd: int
) -> int:
    """Serve until idle or until ``containerd`` (a pidfd) has exited."""
    set_comm(TEMPLATE_COMM)
    set_cmdline([program, "-address", containerd_address, "template"])
    binary = os.path.basename(program)
    # asyncio imports ssl, and with it OpenSSL's setup (~10 ms of the cold path, 0.7 MB of
    # the template), though no shim speaks TLS; asyncio takes the failed import as no TLS.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    # Everything a daemon imports, imported once here and shared by every fork.
    from shim.runtimes.registry import find_runtime, runtime_name_from_binary

    importlib.import_module("shim.daemon")  # shim.manager is imported already
    find_runtime(runtime_name_from_binary(binary)).preload()
    gc.collect()
    gc.freeze()  # the collector never touches (and so never un-shares) these objects

    # Reaped only here, between requests: a SIGCHLD handler could reap a fast child (a
    # `delete`) before its pid is recorded, leaving a pid that never exits.
    children: set[int] = set()

    def reap() -> None:
        with contextlib.suppress(ChildProcessError):
            while (pid := os.waitpid(-1, os.WNOHANG)[0]) > 0:
                children.discard(pid)

    path = listener.getsockname()
    listener.setblocking(False)
    poller = select.poll()
    for fd in (listener.fileno(), containerd):
        poller.register(fd, select.POLLIN)
    idle = idle_time()
    idle_since = time.monotonic()
    while True:
        wait = REAP_INTERVAL if children else idle_since + idle - time.monotonic()
        ready = {fd for fd, _events in poller.poll(max(wait, 0) * 1000)}
        if containerd in ready:
            break  # gone: no one will ask this template again
        if listener.fileno() in ready:
            with contextlib.suppress(BlockingIOError):  # the client left before we accepted
                conn, _ = listener.accept()
                with conn:
                    pid = _fork_child(conn, listener, containerd)
                if pid:
                    children.add(pid)
        reap()
        if children or ready:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= idle:
            break
    # New requests must spawn a new template; those already queued are still served.
    _unlink_if_ours(path, identity)
    with contextlib.suppress(BlockingIOError):
        while True:
            conn, _ = listener.accept()
            with conn:
                _fork_child(conn, listener, containerd)
    return 0


def _fork_child(conn: socket.socket, listener: socket.socket, containerd: int) -> int:
    """Take one relayed command and fork the child that does it; its pid, or 0 if not taken."""
    conn.settimeout(REPLY_TIMEOUT)
    try:
        data, fds, _flags, _addr = socket.recv_fds(conn, MESSAGE_MAX, len(STDIO))
    except OSError:
        return 0  # a probe that connected and left
    try:
        if len(fds) != len(STDIO):
            raise ValueError("stdio descriptors missing")
        argv, cwd, env = decode_request(data)
        conn.send(encode_reply(os.getpid()))  # the ack: from here the command is ours to do
        pid = os.fork()
    except (OSError, ValueError):
        pid = -1  # a broken requester: it reads no ack, or no result
    if pid:
        for fd in fds:
            os.close(fd)
        return max(pid, 0)
    code = 1
    try:
        listener.close()
        os.close(containerd)
        os.setsid()
        for target, fd in zip(STDIO, fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)

        def reply(result: int) -> None:
            with conn:
                conn.send(encode_reply(result))

        code = _run(argv, reply)
    except BaseException:
        traceback.print_exc()  # to the requester's stderr, which containerd reports
        with contextlib.suppress(OSError):
            conn.send(encode_reply(code))
    finally:
        os._exit(code)


def _run(argv: list[str], reply: Callable[[int], object]) -> int:
    """The relayed command, in the forked child; after ``start`` it serves as the daemon."""
    from shim.daemon import serve

    flags, _unknown = parse_flags(argv[1:])
    binary = os.path.basename(argv[0])
    set_comm(binary)
    shown = argv
    if flags.action == "start":  # the daemon's, as containerd's shims show it: no action
        shown = argv[: len(argv) - 1 - argv[::-1].index("start")]
    set_cmdline(shown)
    if flags.action == "delete":
        code = delete(flags, binary)
        reply(code)
        return code
    bound: list[tuple[Flags, socket.socket]] = []

    def serve_here(daemon_flags: Flags, sock: socket.socket) -> int:
        bound.append((daemon_flags, sock))
        return os.getpid()

    code = start(flags, binary, serve_here)
    reply(code)
    if not bound:
        return code
    null_stdio()  # containerd reads our stdout to EOF
    daemon_flags, sock = bound[0]
    return serve(daemon_flags, binary, sock)
