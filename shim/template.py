"""A warmed template process that forks every new shim daemon of one containerd.

A fresh CPython that imports asyncio, protobuf and our modules spends ~100 ms before it can
answer Create and holds ~20 MB of private memory per shim. So the first ``start`` of a
containerd spawns a template that imports the daemon once and freezes those objects
(``gc.freeze``); each later ``start`` sends it the bundle, flags, environment and listening
socket, and the template forks a daemon that serves at once and shares the template's pages
copy-on-write.

Lifetime: the template runs in a session of its own (not containerd's child), serves one
containerd address and one shim binary, and exits once it has had no daemon for IDLE_EXIT
seconds. Daemons are independent of it: if it dies they are reparented like any orphan.
The template names itself TEMPLATE_COMM (/proc/PID/comm) so tools can tell it from a shim.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from shim.main import Flags

TEMPLATE_COMM = "pyshim-template"
IDLE_EXIT = 1.0  # seconds without a daemon before the template exits
REQUEST_MAX = 1 << 20
CONNECT_TIMEOUT = 30.0  # the first request waits for the template's imports


def template_path(socket_dir: str, containerd_address: str) -> str:
    """One template per containerd and per shim program (a new install gets a new one)."""
    program = os.path.realpath(sys.argv[0])
    key = hashlib.sha256(f"{containerd_address}\0{program}".encode()).hexdigest()[:32]
    return os.path.join(socket_dir, f"pyshim-template-{key}")


def _request(flags: Flags, binary: str, action: str) -> bytes:
    env = dict(os.environ)
    return json.dumps(
        {"action": action, "flags": vars(flags), "binary": binary, "cwd": os.getcwd(), "env": env}
    ).encode()


def request_daemon(path: str, flags: Flags, binary: str, sock: socket.socket) -> int:
    """Have the template at path fork a daemon serving sock; spawn the template if needed.

    Returns the daemon's pid. Raises OSError when no template can be reached.
    """
    request = _request(flags, binary, "serve")
    for _ in range(3):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.settimeout(CONNECT_TIMEOUT)
        try:
            try:
                conn.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                _spawn_template(path, binary)
                continue
            socket.send_fds(conn, [request], [sock.fileno()])
            reply = conn.recv(REQUEST_MAX)
        finally:
            conn.close()
        if reply:  # empty: the template exited (idle) as we connected
            return int(json.loads(reply)["pid"])
    raise OSError(errno.EAGAIN, f"no shim template answers at {path}")


def request_delete(path: str, flags: Flags, binary: str) -> int | None:
    """Exit code of `delete` run by a live template into our stdout (warm: no imports), or
    None when no template answers (a dead shim's template may be gone: not worth spawning)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(path)
        sys.stdout.flush()
        socket.send_fds(conn, [_request(flags, binary, "delete")], [sys.stdout.fileno()])
        reply = conn.recv(REQUEST_MAX)
    except OSError:
        return None
    finally:
        conn.close()
    return int(json.loads(reply)["code"]) if reply else None


def _spawn_template(path: str, binary: str) -> None:
    """Bind the template socket here (so a concurrent start finds it) and fork the template."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError as exc:
        listener.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        with contextlib.suppress(OSError):  # a dead template's socket, or a live one: retry
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with probe:
                probe.connect(path)
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        os.umask(old_umask)
    listener.listen(128)
    if os.fork() == 0:
        code = 1
        try:
            _detach()
            # Keep only the listener: an inherited fd such as the first daemon's shim socket
            # would keep that socket connectable (a hang, not a refusal) after the daemon died.
            os.closerange(3, listener.fileno())
            os.closerange(listener.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
            code = _serve_template(listener, binary)
        finally:
            os._exit(code)
    listener.close()


def _detach() -> None:
    """A session of its own and none of the caller's stdio: containerd reads `start`'s stdout
    to EOF, so a process keeping it open would make `start` seem to hang."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _set_comm(name: str) -> None:
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(name[:15])


def _serve_template(listener: socket.socket, binary: str) -> int:
    _set_comm(TEMPLATE_COMM)
    # Everything a daemon imports, imported once here and shared by every fork.
    from shim.daemon import serve
    from shim.manager import delete_here
    from shim.runtimes.registry import find_runtime, runtime_name_from_binary

    find_runtime(runtime_name_from_binary(binary))
    gc.collect()
    gc.freeze()  # the collector never touches (and so never un-shares) these objects

    daemons: set[int] = set()

    def reap(*_: object) -> None:
        with contextlib.suppress(ChildProcessError):
            while (pid := os.waitpid(-1, os.WNOHANG)[0]) > 0:
                daemons.discard(pid)

    signal.signal(signal.SIGCHLD, reap)
    path = listener.getsockname()
    identity = os.stat(path).st_ino
    listener.settimeout(IDLE_EXIT / 4)
    idle_since = time.monotonic()
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            reap()
            if daemons:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_EXIT:
                break
            continue
        with conn:
            pid = _fork_child(conn, listener, serve, delete_here)
            if pid:
                daemons.add(pid)
        # Idle also counts from the last request: a daemon that lived between two ticks is
        # never seen by them, and a container's `delete` comes as its daemon exits.
        idle_since = time.monotonic()
    # New starts must spawn a new template; those already queued are still served.
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == identity:
            os.unlink(path)
    listener.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            conn, _ = listener.accept()
            with conn:
                _fork_child(conn, listener, serve, delete_here)
    return 0


def _fork_child(
    conn: socket.socket,
    listener: socket.socket,
    serve: Callable[[Flags, str, socket.socket], int],
    delete: Callable[[Flags, str], int],
) -> int:
    """Fork a child for one request: a daemon (its pid returned and replied) or a `delete`
    writing to the requester's stdout (the child replies its exit code; 0 returned)."""
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        data, fds, _flags, _addr = socket.recv_fds(conn, REQUEST_MAX, 1)
        request = json.loads(data)
    except (OSError, ValueError):
        return 0  # a probe that connected and left, or a broken requester
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return 0
    pid = os.fork()
    if pid:
        os.close(fds[0])
        if request["action"] != "serve":
            return 0
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"pid": pid}).encode())
        return pid
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        listener.close()
        os.setsid()
        _set_comm(request["binary"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        flags = Flags(**request["flags"])
        if request["action"] == "serve":
            conn.close()
            code = serve(flags, request["binary"], socket.socket(fileno=fds[0]))
        else:
            os.dup2(fds[0], 1)
            os.close(fds[0])
            code = delete(flags, request["binary"])
            conn.send(json.dumps({"code": code}).encode())
    finally:
        os._exit(code)
