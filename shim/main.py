"""Entry point of every pyshim binary: ``start``, ``delete``, ``-v``, ``-info`` or serve.

Kept to interpreter built-ins: this module runs on every container start and delete.
"""

from __future__ import annotations

import os
import sys

from shim import VERSION
from shim.flags import UsageError, parse_flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    try:
        flags, _unknown = parse_flags(argv[1:])
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    binary = os.path.basename(argv[0])
    if flags.v:
        print(
            f"{binary}:\n  Version: {VERSION}\n  Runtime: pyshim (Python {sys.version.split()[0]})"
        )
        return 0
    if flags.info:
        from shim.info import runtime_info

        stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
        sys.stdout.buffer.write(runtime_info(binary, stdin).SerializeToString())
        return 0
    if flags.action in ("start", "delete"):
        from shim.relay import relay

        def spawn(path: str) -> None:
            from shim.template import spawn_template

            spawn_template(path, argv[0], flags.address)

        code = relay(argv, flags.address, spawn)  # done by the warm template: no imports here
        if code is not None:
            sys.stderr.flush()
            os._exit(code)  # interpreter teardown would add ~1 ms to every container
        from shim import manager

        return (manager.start if flags.action == "start" else manager.delete)(flags, binary)
    if flags.action:
        print(f"unknown action {flags.action!r}", file=sys.stderr)
        return 2
    from shim.daemon import serve_from_socket_flag

    return serve_from_socket_flag(flags, binary)


def launched() -> int:
    """``pyshim-shim ARGV0 ARGS...``: the native launcher's fallback (shim/native/launcher.c),
    which passes its own argv[0] first since the interpreter's argv replaces it."""
    if len(sys.argv) < 2:
        print("usage: pyshim-shim SHIM-PROGRAM [FLAGS] [ACTION]", file=sys.stderr)
        return 2
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
