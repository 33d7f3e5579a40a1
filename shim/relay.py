"""``start`` and ``delete`` handed to the warm template: the hot path of every container.

containerd runs both once per container and waits for each (1.6 runs ``delete`` whenever a
shim's connection closes). A fresh CPython that imports what they need takes ~50 ms, a bare one
~10 ms. So this module uses only interpreter built-ins: it sends the template (shim.template)
our argv, working directory, environment and stdio descriptors; a child the template forks does
the command against our stdio (and, after ``start``, stays on as the shim daemon); we exit with
its code. The native launcher (shim/native/launcher.c) is the same client in C; both speak the
protocol in docs/ARCHITECTURE.md, which the encoders and decoders below implement.
"""

from __future__ import annotations

import _socket
import os
import sys
from _collections_abc import Callable  # loaded by os already; collections.abc costs 1.5 ms

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
WORD = 4  # counts and replies: 32-bit integers in the host's byte order (one host, one socket)
EXIT_MAX = 255


def template_path(containerd_address: str, program: str) -> str:
    """One template per containerd and per shim program; reinstalling the program (a new
    file) gets a new template, so new containers run the new code."""
    program = os.path.realpath(program)
    installed = os.stat(program).st_mtime_ns
    key = sha256(
        b"\0".join([os.fsencode(containerd_address), os.fsencode(program), b"%d" % installed])
    )
    return os.path.join(SOCKET_DIR, f"pyshim-template-{key.hexdigest()[:32]}")


def _word(value: int) -> bytes:
    return value.to_bytes(WORD, sys.byteorder, signed=True)


def encode_request(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    """argc, envc, then argv, cwd and each NAME=VALUE, every string ended by a NUL."""
    strings = [*argv, cwd, *(f"{name}={value}" for name, value in env.items())]
    return b"".join([_word(len(argv)), _word(len(env)), *(os.fsencode(s) + b"\0" for s in strings)])


def decode_request(data: bytes) -> tuple[list[str], str, dict[str, str]]:
    argc = int.from_bytes(data[:WORD], sys.byteorder, signed=True)
    envc = int.from_bytes(data[WORD : 2 * WORD], sys.byteorder, signed=True)
    strings = data[2 * WORD :].split(b"\0")
    if len(data) < 2 * WORD or argc < 1 or envc < 0 or len(strings) != argc + envc + 2:
        raise ValueError("malformed template request")
    if strings.pop():
        raise ValueError("malformed template request: the last string has no NUL")
    argv = [os.fsdecode(s) for s in strings[:argc]]
    env: dict[str, str] = {}
    for entry in strings[argc + 1 :]:
        name, has_value, value = os.fsdecode(entry).partition("=")
        if has_value:  # as os.environ reads its own: entries with no "=" are skipped,
            env.setdefault(name, value)  # and the first of a repeated name wins
    return argv, os.fsdecode(strings[argc]), env


def encode_reply(value: int) -> bytes:
    return _word(value)


def decode_reply(data: bytes, maximum: int) -> int:
    """The ack (the template's pid) or the result (an exit code, at most EXIT_MAX)."""
    value = int.from_bytes(data, sys.byteorder, signed=True)
    if len(data) != WORD or not 0 <= value <= maximum:
        raise ValueError(f"malformed reply from the shim template: {data[:16]!r}")
    return value


def relay(argv: list[str], containerd_address: str, spawn: Callable[[str], object]) -> int | None:
    """The exit code of the command done by the template, or None when no template could take
    it (the caller then does it here). ``spawn(path)`` starts a template listening at path."""
    try:
        path = template_path(containerd_address, argv[0])
    except OSError:  # not run by its path: no template to find
        return None
    request = encode_request(argv, os.getcwd(), dict(os.environ))
    if len(request) > MESSAGE_MAX:
        return None
    descriptors = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in STDIO)
    program = os.path.basename(argv[0])
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
            ack = conn.recv(MESSAGE_MAX)
            if not ack:
                continue  # the template exited (idle) before taking it
            return _result(conn, ack, program)
        except OSError:
            return None
        finally:
            conn.close()
    return None


def _result(conn: _socket.socket, ack: bytes, program: str) -> int:
    """Once the template took the request, the command is done there or not at all."""
    try:
        decode_reply(ack, 2**31 - 1)
        result = conn.recv(MESSAGE_MAX)
        if not result:
            raise ValueError("the shim template's worker died")
        return decode_reply(result, EXIT_MAX)
    except (OSError, ValueError) as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 1
