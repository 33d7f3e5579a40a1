"""Finds a backend by name: the built-in ones, then the ``pyshim.runtimes`` entry points.

A third-party package adds a backend by declaring, in its own metadata, an entry point
``<name> = "pkg.module:RuntimeClass"`` in the group ``pyshim.runtimes`` and a console script
``containerd-shim-<name>-v1 = "shim.main:main"``.
"""

from __future__ import annotations

import importlib

from shim.runtimes.base import Runtime

ENTRY_POINT_GROUP = "pyshim.runtimes"

# Built-ins skip the entry-point scan, which costs milliseconds on every shim start.
_BUILTIN = {
    "pyrunc": "shim.runtimes.runc:RuncRuntime",
    "pyrunsc": "shim.runtimes.runsc:RunscRuntime",
    "pywasm": "shim.runtimes.wasm:WasmRuntime",
    "pykata": "shim.runtimes.kata:KataRuntime",
}


def builtin_runtime_names() -> tuple[str, ...]:
    """The backends pyshim ships (each with a ``containerd-shim-<name>-v1`` console script)."""
    return tuple(_BUILTIN)


class UnknownRuntimeError(LookupError):
    pass


def _load(target: str) -> type[Runtime]:
    module_name, _, attribute = target.partition(":")
    runtime = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(runtime, type) and issubclass(runtime, Runtime)):
        raise TypeError(f"{target} is not a pyshim Runtime")
    return runtime


def find_runtime(name: str) -> type[Runtime]:
    if name in _BUILTIN:
        return _load(_BUILTIN[name])
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return _load(entry.value)
    known = sorted({*_BUILTIN, *(e.name for e in entry_points(group=ENTRY_POINT_GROUP))})
    raise UnknownRuntimeError(f"no pyshim runtime named {name!r} (known: {', '.join(known)})")


def runtime_name_from_binary(binary: str) -> str:
    """``containerd-shim-pyrunc-v1`` -> ``pyrunc`` (containerd's naming rule, reversed)."""
    base = binary.rsplit("/", 1)[-1]
    prefix = "containerd-shim-"
    if not base.startswith(prefix) or "-" not in base[len(prefix) :]:
        raise UnknownRuntimeError(f"cannot tell the runtime from the binary name {base!r}")
    return base[len(prefix) :].rsplit("-", 1)[0]


def runtime_type(name: str) -> str:
    """``pyrunc`` -> ``io.containerd.pyrunc.v1``, the runtime type users give containerd."""
    return f"io.containerd.{name}.v1"
