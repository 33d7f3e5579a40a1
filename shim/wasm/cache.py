"""Precompiled modules on disk, keyed by the module's digest and the engine, so that the second
start of an image skips compilation (the largest part of a cold start).

Entries are written to a temp file and renamed into place, so concurrent starts of the same
module never see half an entry; whoever renames last wins with identical content. The directory
is bounded: after a write the least recently used entries go. Deserializing runs native code
from the file, so the directory belongs to root alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass

import wasmtime

from shim.sys.files import replace_file

_SUFFIX = ".cwasm"


@dataclass(frozen=True)
class Loaded:
    module: wasmtime.Module
    entry: str  # the cache file
    hit: bool


class ModuleCache:
    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    def load(self, engine: wasmtime.Engine, module_path: str) -> Loaded:
        with open(module_path, "rb") as f:
            wasm = f.read()
        entry = os.path.join(self.directory, _key(wasm) + _SUFFIX)
        try:
            module = wasmtime.Module.deserialize_file(engine, entry)
        except (OSError, wasmtime.WasmtimeError):
            # Missing, evicted under us, or written by an incompatible engine: compile anew.
            module = wasmtime.Module(engine, wasm)
            self._store(entry, module.serialize())
            return Loaded(module, entry, hit=False)
        with contextlib.suppress(OSError):
            os.utime(entry)  # recently used: evicted last
        return Loaded(module, entry, hit=True)

    def _store(self, entry: str, compiled: bytearray) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        replace_file(entry, bytes(compiled), 0o600)
        self._evict(keep=entry)

    def _evict(self, keep: str) -> None:
        entries = []
        with os.scandir(self.directory) as listing:
            for item in listing:
                if item.name.endswith(_SUFFIX) and item.path != keep:
                    with contextlib.suppress(OSError):
                        stat = item.stat()
                        entries.append((stat.st_mtime, stat.st_size, item.path))
        total = sum(size for _, size, _ in entries) + os.stat(keep).st_size
        for _, size, path in sorted(entries):  # oldest first
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size


def _key(wasm: bytes) -> str:
    # Compiled code is only valid for the same engine build and host CPU family.
    engine = f"wasmtime-{importlib.metadata.version('wasmtime')}-{platform.machine()}"
    return f"{hashlib.sha256(wasm).hexdigest()}-{engine}"
