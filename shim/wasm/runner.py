"""The child process that runs one wasm module: ``run(REQUEST, LABEL)`` in a fork of the shim,
shown as ``pyshim-wasm LABEL``.

The shim forks it (shim.sys.spawn.fork_call) with the process's stdio on fds 0-2, a report pipe
on fd 3, a start pipe on fd 4 and the namespaces to join from fd 5 on. It enters the container's
namespaces and mounts, compiles (or loads from the cache) and instantiates the module, reports
"ready", and runs the module only when the shim writes to the start pipe: by then it is in the
container's cgroup and containerd has asked for Start. Its exit code is the module's.

REQUEST is JSON: module and rootfs (host paths), cwd (a host directory inside the rootfs, or
null for "/"), args, env, cache_dir, cache_max_bytes, and context (shim.wasm.context.Context:
the namespaces and bind mounts entered before anything else, so that the preopened rootfs
shows the spec's bind mounts). Memory is limited by the container's cgroup alone, as for a
Linux container: Update changes it live, and a module past it is OOM-killed (the kubelet's
OOMKilled) instead of seeing malloc fail. Reports are JSON lines on fd 3; the shim logs them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import wasmtime

from shim.sys.cmdline import set_cmdline, set_comm
from shim.wasm import context
from shim.wasm.cache import ModuleCache

REPORT_FD = 3
START_FD = 4
NAMESPACE_FD = 5  # the namespace files to join, on 5, 6, ... in the order of context["join"]
# What `wasmtime run` exits with on a trap: 128 + SIGABRT, as if the program had aborted.
TRAP_EXIT = 134
FAILED_EXIT = 125  # the module never ran
PROCESS_NAME = "pyshim-wasm"


def report(**message: Any) -> None:
    os.write(REPORT_FD, (json.dumps(message) + "\n").encode())


def run(request_json: str, label: str) -> int:
    """Load, report, wait for the start pipe, run; the module's exit code. Its signals must
    have their default actions (fork_call sees to it): a module in a loop never returns to the
    interpreter to run a Python handler. `label` (container id[/exec id]) names the process."""
    # Not the shim's command line it was forked with: ps and pgrep -f would count it a shim.
    set_comm(PROCESS_NAME)
    set_cmdline([PROCESS_NAME, label])
    request = json.loads(request_json)
    try:
        # Before wasmtime starts any thread: setns and unshare act on the calling thread.
        joins = range(NAMESPACE_FD, NAMESPACE_FD + len(request["context"]["join"]))
        context.enter(request["context"], request["rootfs"], joins)
    except OSError as exc:
        report(error=f"cannot enter the container's namespaces and mounts: {exc}")
        return FAILED_EXIT
    try:
        engine = wasmtime.Engine()
        started = time.monotonic()
        cache = ModuleCache(request["cache_dir"], request["cache_max_bytes"])
        loaded = cache.load(engine, request["module"])
        report(
            cache="hit" if loaded.hit else "miss",
            entry=loaded.entry,
            seconds=round(time.monotonic() - started, 4),
        )
        store = wasmtime.Store(engine)
        store.set_wasi(_wasi_config(wasmtime.WasiConfig(), request))
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        instance = linker.instantiate(store, loaded.module)
        entry = instance.exports(store).get("_start")
        if not isinstance(entry, wasmtime.Func):
            raise ValueError("the module exports no _start function (not a WASI command)")
    except (OSError, ValueError, wasmtime.WasmtimeError) as exc:
        report(error=f"the module failed to load: {exc}")
        return FAILED_EXIT
    report(ready=True)
    if not os.read(START_FD, 1):
        return FAILED_EXIT  # the shim gave up on this process before starting it
    try:
        entry(store)
    except wasmtime.ExitTrap as exit_trap:
        return exit_trap.code
    except (wasmtime.Trap, wasmtime.WasmtimeError) as trap:
        report(trap=str(trap))
        return TRAP_EXIT
    return 0


def _wasi_config(config: wasmtime.WasiConfig, request: dict[str, Any]) -> wasmtime.WasiConfig:
    config.argv = request["args"]
    config.env = [tuple(item.split("=", 1)) for item in request["env"] if "=" in item]
    config.inherit_stdin()
    config.inherit_stdout()
    config.inherit_stderr()
    config.preopen_dir(request["rootfs"], "/")
    if request["cwd"] is not None:
        # WASI has no working directory; libc resolves relative paths against a "." preopen.
        config.preopen_dir(request["cwd"], ".")
    return config
