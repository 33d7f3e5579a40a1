"""``start`` and ``delete`` handed to the warm template: the hot path of every container.

containerd runs both once per container and waits for each (1.6 runs ``delete`` whenever a
shim's connection closes). A fresh CPython that imports what they need takes ~50 ms, a bare one
~10 ms. So this module uses only interpreter built-ins: it sends the template (shim.template)
our argv, working directory, environment and stdio descriptors; a child the template forks does
the command against our stdio (and, after ``start``, stays on as the shim daemon); we exit with
its code.

Protocol on the template's SOCK_SEQPACKET socket, each message marshalled:
    request  (argv, cwd, env) + SCM_RIGHTS [stdin, stdout, stderr]
    ack      the template's pid, once it has taken the request
    result   the exit code of the child that did the command
An ack that never comes means the template exited without taking the request (nothing was
done: asking again is safe); a result that never comes means the child died.
"""

from __future__ import annotations

import _socket
import marshal
import os
import sys
from collections.abc import Callable

try:
    from _sha256 import sha256  # type: ignore[import-not-found]  # no stub; hashlib costs 4 ms
except ImportError:  # Python 3.12+ names the built-in _sha2
    from hashlib import sha256

SOCKET_DIR = "/run/containerd/s"  # containerd's default state dir; the reference shims hard-code it
MESSAGE_MAX = 1 << 20
ATTEMPTS = 3
# The first request waits for a new template's imports; later ones for one fork. A slow
# `runc delete` stays below containerd's own timeouts for these commands.
REPLY_TIMEOUT = 60.0
STDIO = (0, 1, 2)


def template_path(containerd_address: str, program: str) -> str:
    """One template per containerd and per shim program; reinstalling the program (a new
    file) gets a new template, so new containers run the new code."""
    program = os.path.realpath(program)
    installed = os.stat(program).st_mtime_ns
    key = sha256(f"{containerd_address}\0{program}\0{installed}".encode()).hexdigest()
    return os.path.join(SOCKET_DIR, f"pyshim-template-{key[:32]}")


def encode_request(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    return marshal.dumps((argv, cwd, env))


def decode_request(data: bytes) -> tuple[list[str], str, dict[str, str]]:
    argv, cwd, env = marshal.loads(data)
    if not (
        isinstance(argv, list)
        and argv
        and all(isinstance(arg, str) for arg in argv)
        and isinstance(cwd, str)
        and isinstance(env, dict)
    ):
        raise ValueError("malformed template request")
    return argv, cwd, env


def relay(argv: list[str], containerd_address: str, spawn: Callable[[str], object]) -> int | None:
    """The exit code of the command done by the template, or None when no template could take
    it (the caller then does it here). ``spawn(path)`` starts a template listening at path."""
    try:
        path = template_path(containerd_address, argv[0])
    except OSError:  # not run by its path: no template to find
        return None
    request = encode_request(argv, os.getcwd(), dict(os.environ))
    descriptors = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in STDIO)
    for _ in range(ATTEMPTS):
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            conn.settimeout(REPLY_TIMEOUT)
            try:
                conn.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                spawn(path)
                continue
            conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, descriptors)])
            if not conn.recv(MESSAGE_MAX):
                continue  # the template exited (idle) before taking it
            return _result(conn, os.path.basename(argv[0]))
        except OSError:
            return None
        finally:
            conn.close()
    return None


def _result(conn: _socket.socket, program: str) -> int:
    """Once the template took the request, the command is done there or not at all."""
    try:
        result = conn.recv(MESSAGE_MAX)
    except OSError as exc:
        result = b""
        reason = str(exc)
    else:
        reason = "the shim template's worker died"
    if not result:
        print(f"{program}: {reason}", file=sys.stderr)
        return 1
    return int(marshal.loads(result))
