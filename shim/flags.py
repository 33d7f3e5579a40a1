"""The flags containerd passes a shim (Go ``flag`` syntax: ``-name value``, ``-name=value``).

Imports nothing of ours: every module of the entry layer (main, relay, template, manager,
daemon, bootstrap, info) reads flags, so this is where their imports end.
"""

from __future__ import annotations


class UsageError(Exception):
    pass


class Flags:
    """A plain class: importing dataclasses would cost every ``start`` and ``delete`` ~10 ms."""

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
BOOL_FLAGS = {name for name, value in _DEFAULTS.items() if isinstance(value, bool)}
# Flags that take a value: the native launcher is compiled with this list (shim/native/build.py).
VALUE_FLAGS = {name for name, value in _DEFAULTS.items() if isinstance(value, str)} - {"action"}


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
        if key in BOOL_FLAGS:
            setattr(flags, key, value.lower() in ("1", "t", "true") if has_value else True)
        elif key in VALUE_FLAGS:
            if not has_value:
                if not args:
                    raise UsageError(f"flag needs an argument: -{name}")
                value = args.pop(0)
            setattr(flags, key, value)
        else:
            unknown.append(name)
    return flags, unknown
