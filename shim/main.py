"""Entry point of every pyshim binary: ``start``, ``delete``, ``-v``, ``-info`` or serve.

Kept to interpreter built-ins: this module runs on every container start and delete.
"""

from __future__ import annotations

import os
import sys

VERSION = "0.1.0"


class UsageError(Exception):
    pass


class Flags:
    """The flags containerd passes (Go ``flag`` syntax: ``-name value``, ``-name=value``).

    A plain class: importing dataclasses would cost every ``start`` and ``delete`` ~10 ms."""

    def __init__(
        self,
        namespace: str = "",
        id: str = "",
        address: str = "",
        publish_binary: str = "",
        bundle: str = "",
        socket: str = "",
        debug_socket: str = "",
        debug: bool = False,
        v: bool = False,
        info: bool = False,
        action: str = "",
    ) -> None:
        self.namespace = namespace
        self.id = id
        self.address = address
        self.publish_binary = publish_binary
        self.bundle = bundle
        self.socket = socket
        self.debug_socket = debug_socket
        self.debug = debug
        self.v = v
        self.info = info
        self.action = action

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flags) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Flags(**{vars(self)!r})"


_DEFAULTS = vars(Flags())
_BOOL_FLAGS = {name for name, value in _DEFAULTS.items() if isinstance(value, bool)}
_VALUE_FLAGS = {name for name, value in _DEFAULTS.items() if isinstance(value, str)} - {"action"}


def parse_flags(argv: list[str]) -> tuple[Flags, list[str]]:
    """Returns the flags and the names of unknown flags (ignored, so a newer containerd's flags
    do not break us)."""
    flags = Flags()
    unknown: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            flags.action = arg
            break
        name, has_value, value = arg.lstrip("-").partition("=")
        key = name.replace("-", "_")
        if key in _BOOL_FLAGS:
            setattr(flags, key, value.lower() in ("1", "t", "true") if has_value else True)
        elif key in _VALUE_FLAGS:
            if not has_value:
                if not args:
                    raise UsageError(f"flag needs an argument: -{name}")
                value = args.pop(0)
            setattr(flags, key, value)
        else:
            unknown.append(name)
    return flags, unknown


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

        code = relay(argv, flags.address)  # done by the warm template: no imports here
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


if __name__ == "__main__":
    sys.exit(main())
