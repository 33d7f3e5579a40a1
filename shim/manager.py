"""The short-lived shim commands containerd runs: ``start`` and ``delete``.

Both normally run in a child of the warm template (shim.relay, shim.template); here only when
no template can be reached, at the cost of this process's imports.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable

from shim.bootstrap import answer, read_request
from shim.flags import Flags
from shim.relay import SOCKET_DIR
from shim.runtimes.cri import SANDBOX_ID

GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", SANDBOX_ID)
MAX_SOCKET_PATH = 106


def grouping_id(bundle: str, task_id: str) -> str:
    """Containers with the same group share one shim (CRI: one shim per pod)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            annotations = json.load(f).get("annotations") or {}
    except (OSError, ValueError):
        return task_id
    for key in GROUP_ANNOTATIONS:
        if annotations.get(key):
            return str(annotations[key])
    return task_id


def socket_path(
    containerd_address: str, namespace: str, group: str, directory: str = SOCKET_DIR
) -> str:
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, group).encode()).hexdigest()
    return os.path.join(directory, digest)


def _write_atomically(path: str, content: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _is_alive(path: str, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether something listens at ``path``; one too busy to accept at once counts."""
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(0.1)
    try:
        probe.connect(path)
        return True
    except TimeoutError:
        return True  # a full backlog: alive, only busy
    except OSError:
        return False
    finally:
        probe.close()


def bind_socket(path: str, kind: int = socket.SOCK_STREAM) -> socket.socket | None:
    """A listening socket at ``path``, or None when a live server already listens there."""
    if len(path) > MAX_SOCKET_PATH:
        raise OSError(errno.ENAMETOOLONG, f"socket path too long: {path}")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            old_umask = os.umask(0o177)  # the socket is created 0600: only root reaches it
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            sock.listen(128)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            if _is_alive(path, kind):
                return None
            # A dead server's leftover (SIGKILL leaves the file); another starter may have
            # removed it first.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    raise OSError(errno.EADDRINUSE, f"cannot bind {path}")


def _copy_oom_score(child: int) -> None:
    """The shim is a little more killable than containerd, as the reference shim sets it."""
    try:
        with open(f"/proc/{os.getppid()}/oom_score_adj") as f:
            score = int(f.read().strip())
        with open(f"/proc/{child}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))
    except (OSError, ValueError):
        pass


def start(
    flags: Flags, binary: str, launch: Callable[[Flags, socket.socket], int] | None = None
) -> int:
    """Print the shim's address, and have ``launch`` serve it (default: a forked daemon)."""
    bundle = flags.bundle or os.getcwd()
    request = read_request(flags, b"" if sys.stdin.isatty() else sys.stdin.buffer.read())
    flags = request.flags
    if request.ttrpc_address:  # the daemon's events go there
        os.environ["TTRPC_ADDRESS"] = request.ttrpc_address
    group = grouping_id(bundle, flags.id)
    path = socket_path(flags.address, flags.namespace, group, request.socket_dir or SOCKET_DIR)
    address = "unix://" + path
    try:
        sock = bind_socket(path)
    except OSError as exc:
        print(f"{binary}: cannot listen on {path}: {exc}", file=sys.stderr)
        return 1
    _write_atomically(os.path.join(bundle, "address"), address)
    if sock is not None:
        if launch is None:
            child = _spawn_daemon(flags, binary, sock)
            sock.close()
        else:
            child = launch(flags, sock)
        _write_atomically(os.path.join(bundle, "shim.pid"), str(child))
        _copy_oom_score(child)
    sys.stdout.buffer.write(answer(request, address, os.environ))
    sys.stdout.flush()
    return 0


def detach() -> None:
    """A session of its own and none of containerd's pipes, or `start` would seem to hang
    until this process died (containerd reads its stdout to EOF)."""
    os.setsid()
    null_stdio()


def null_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _spawn_daemon(flags: Flags, binary: str, sock: socket.socket) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        detach()
        from shim.daemon import serve

        code = serve(flags, binary, sock)
    except BaseException:
        code = 1
    os._exit(code)


def _shim_socket(bundle: str) -> str | None:
    """The socket path `start` wrote to the bundle's address file."""
    try:
        with open(os.path.join(bundle, "address")) as f:
            return f.read().strip().removeprefix("unix://")
    except OSError:
        return None


def _remove_dead_socket(bundle: str) -> bool:
    """Whether the shim `start` recorded in the bundle is dead; if so its socket file (a
    SIGKILL leaves it) is removed."""
    path = _shim_socket(bundle)
    if path is None or _is_alive(path):
        return False
    if path.startswith(SOCKET_DIR + "/"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return True


def _group_members(bundle: str, task_id: str) -> list[tuple[str, str]]:
    """(id, bundle) of the other tasks of this task's group: the bundles beside it (containerd
    keeps a namespace's bundles in one directory, named by task id) of the same group."""
    group = grouping_id(bundle, task_id)
    members = []
    with contextlib.suppress(OSError), os.scandir(os.path.dirname(bundle)) as entries:
        for entry in entries:
            if entry.name != task_id and grouping_id(entry.path, entry.name) == group:
                members.append((entry.name, entry.path))
    return members


def delete(flags: Flags, binary: str) -> int:
    """Clean up after a dead shim. Prints only the DeleteResponse; safe to run twice."""
    from shim.runtimes.registry import find_runtime, runtime_name_from_binary

    bundle = os.path.abspath(flags.bundle or os.getcwd())
    runtime = find_runtime(runtime_name_from_binary(binary))
    pid = runtime.cleanup(flags.namespace, bundle, flags.id)
    if _remove_dead_socket(bundle):
        # containerd 2.x runs `delete` only for the task that started a group's shim (the
        # others reused its bootstrap): every other task that shim served is orphaned too.
        for member_id, member_bundle in _group_members(bundle, flags.id):
            socket_path = _shim_socket(member_bundle)
            if socket_path and _is_alive(socket_path):
                break  # a new shim of the group serves it (at the same address): it is live
            runtime.cleanup(flags.namespace, member_bundle, member_id)

    from google.protobuf.timestamp_pb2 import Timestamp

    from shim.api.task.v2.shim_pb2 import DeleteResponse

    exited_at = Timestamp()
    exited_at.FromNanoseconds(time.time_ns())
    response = DeleteResponse(pid=pid, exit_status=128 + 9, exited_at=exited_at)
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0
