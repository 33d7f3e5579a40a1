"""The WebAssembly backend: WASI modules from ordinary OCI images, run on wasmtime.

Under Kubernetes' CRI a pod's pause container is a Linux program, not a module: like runwasi,
the backend runs it as a plain Linux container through runc (the pyrunc backend's container),
and every other container of the pod as modules. The CRI annotation decides, not the binary's
header, so that an app container that is not a module fails with a clear error.

Each process (init or exec) is a child of the shim running ``shim.wasm.runner``, placed in the
container's cgroup, so Kill, Pause/Resume, Pids, Stats and Update act on it like on a Linux
container. The child is a fork of the daemon, which (like the template it came from) has
wasmtime imported but never compiles or runs a module itself: a stuck or crashing module takes
only its own process down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from shim.runtimes import oci
from shim.runtimes.base import (
    INIT_PID_FILE,
    CheckpointRequest,
    Container,
    ContainerConfig,
    Launched,
    ProcessStdio,
    Runtime,
    recorded_init_pid,
)
from shim.runtimes.cri import SANDBOX_ID, annotation, is_pod_sandbox
from shim.runtimes.runc import RuncRuntime
from shim.sys.cgroup_limits import refuse_unapplied
from shim.sys.spawn import fork_call
from shim.ttrpc.errors import Code, TtrpcError
from shim.wasm import context as wasm_context
from shim.wasm import runner
from shim.wasm.cgroup import ContainerCgroup, cgroup_path

log = logging.getLogger(__name__)

WASM_MAGIC = b"\0asm"
CACHE_DIR_ENV = "PYSHIM_WASM_CACHE"
DEFAULT_CACHE_DIR = "/var/lib/pyshim/wasm-cache"
CACHE_MAX_BYTES = 512 * 1024 * 1024
READY_TIMEOUT = 60.0  # compiling a large module takes seconds; the first start pays it
DELETE_TIMEOUT = 4.0  # containerd gives a shim's delete 5 s
_REPORT_CHUNK = 65536
# In a pod's pause bundle: the cgroup of every module container of the pod, one a line.
POD_MODULES_FILE = "pywasm-modules"
# Checked against wasmtime-py 51: Module.serialize saves compiled code only; a Store's
# memories, globals and tables, and the native stack of a call in progress, have no save or
# restore (Wizer, beside wasmtime, makes a module of an instance's state once its initializer
# returned: not of a call that is running).
NO_CHECKPOINT = (
    "pywasm cannot checkpoint or restore: wasmtime has no way to save a running instance (its"
    " memories, globals and the call in progress), only compiled modules"
)


def _load_spec(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec: dict[str, Any] = json.load(f)
    except (OSError, ValueError) as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"cannot read the OCI spec: {exc}") from exc
    return spec


def _inside(rootfs: str, path: str) -> str:
    """`path` (absolute in the container) as a host path, symlinks resolved; it must stay in
    the rootfs."""
    real = os.path.realpath(os.path.join(rootfs, path.lstrip("/")))
    if os.path.commonpath([rootfs, real]) != rootfs:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"{path} leads outside the container's rootfs")
    return real


def record_in_pod(spec: Mapping[str, Any], bundle: str, cgroup: str) -> None:
    """Note a module container's cgroup in its pod's pause bundle (a sibling of `bundle`).
    containerd 2.x runs `delete` after a shim's death only for the task that started the
    shim, the pause, and has removed the app containers' bundles by then: the pause's
    cleanup must find their cgroups (and so their runners) here."""
    sandbox = annotation(spec, SANDBOX_ID)
    pod_bundle = os.path.join(os.path.dirname(bundle), sandbox)
    if not sandbox or "/" in sandbox or not os.path.isdir(pod_bundle):
        return
    with open(os.path.join(pod_bundle, POD_MODULES_FILE), "a") as f:
        f.write(cgroup + "\n")


def _remove_pod_modules(bundle: str) -> None:
    try:
        with open(os.path.join(bundle, POD_MODULES_FILE)) as f:
            cgroups = dict.fromkeys(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        return
    for path in cgroups:
        try:
            ContainerCgroup(path).remove()
        except (OSError, ValueError) as exc:
            log.warning("module cgroup %s cleanup: %s", path, exc)


def _entrypoint(rootfs: str, cwd: str, name: str, env: Sequence[str]) -> str:
    """args[0] as a host path. A path is relative to cwd; a bare name is looked for in cwd,
    then on the process's PATH (as runwasi resolves it), so that `sh` is found to be no
    module rather than missing."""
    if "/" not in name:
        path_dirs = next((e[5:].split(":") for e in env if e.startswith("PATH=")), [])
        for directory in [cwd, *(d for d in path_dirs if d.startswith("/"))]:
            found = _inside(rootfs, os.path.join(directory, name))
            if os.path.isfile(found):
                return found
    return _inside(rootfs, os.path.join(cwd, name))


def runner_request(
    process: Mapping[str, Any], rootfs: str, context: wasm_context.Context | None = None
) -> str:
    """The runner's REQUEST for an OCI Process: checks that args[0] is a wasm module.
    `context`: the namespaces and mounts to enter (none: the shim's own)."""
    args = [str(a) for a in process.get("args") or []]
    if not args:
        raise TtrpcError(Code.INVALID_ARGUMENT, "process.args is empty: no module to run")
    cwd = "/" + str(process.get("cwd") or "/").strip("/")
    env = [str(e) for e in process.get("env") or []]
    module = _entrypoint(rootfs, cwd, args[0], env)
    try:
        with open(module, "rb") as f:
            magic = f.read(len(WASM_MAGIC))
    except OSError as exc:
        raise TtrpcError(
            Code.INVALID_ARGUMENT, f"entrypoint {args[0]}: not in the image: {exc.strerror}"
        ) from exc
    if magic != WASM_MAGIC:
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"entrypoint {args[0]} is not a WebAssembly module (no \\0asm header): "
            "this runtime runs only .wasm programs",
        )
    request = {
        "module": module,
        "rootfs": rootfs,
        "cwd": None if cwd == "/" else _inside(rootfs, cwd),
        "args": args,
        "env": env,
        "cache_dir": os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR,
        "cache_max_bytes": CACHE_MAX_BYTES,
        "context": context or wasm_context.plan({}),
    }
    return json.dumps(request)


class _Reports:
    """The JSON lines a runner writes on its report pipe: logged as they arrive; `ready`
    resolves to None once the module is ready to run, else to why it never will be."""

    def __init__(self, fd: int, label: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[str | None] = self._loop.create_future()
        self._fd: int | None = fd
        self._label = label
        self._pending = b""
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._read)

    def _read(self) -> None:
        assert self._fd is not None
        try:
            chunk = os.read(self._fd, _REPORT_CHUNK)
        except BlockingIOError:
            return
        if not chunk:  # the runner exited
            self.close()
            self._resolve("the runner exited before the module was ready")
            return
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            try:
                self._handle(json.loads(line))
            except (ValueError, AttributeError):
                log.warning("%s: unreadable runner report %r", self._label, line)

    def _handle(self, message: dict[str, Any]) -> None:
        if message.get("ready"):
            self._resolve(None)
        elif "error" in message:
            log.error("%s: %s", self._label, message["error"])
            self._resolve(str(message["error"]))
        elif "trap" in message:
            log.warning("%s: wasm trap: %s", self._label, message["trap"])
        elif "cache" in message:
            log.info(
                "%s: module cache %s (%s) in %s s",
                self._label,
                message["cache"],
                message.get("entry"),
                message.get("seconds"),
            )

    def _resolve(self, outcome: str | None) -> None:
        if not self.ready.done():
            self.ready.set_result(outcome)

    def close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


class WasmContainer(Container):
    def __init__(self, runtime: WasmRuntime, config: ContainerConfig) -> None:
        self._context = runtime.context
        self._config = config
        self._spec: dict[str, Any] = {}
        self._rootfs = ""
        self._cgroup: ContainerCgroup | None = None
        self._init: Launched | None = None
        self._start_fd: int | None = None  # the init's start pipe, until Start
        self._children: dict[int, asyncio.Future[Any]] = {}  # every live runner: pid -> exit

    @property
    def _id(self) -> str:
        return self._config.id

    async def create(self) -> Launched | None:
        if self._config.checkpoint:
            raise NotImplementedError(NO_CHECKPOINT)
        self._spec = _load_spec(self._config.bundle)
        root = self._spec.get("root", {}).get("path") or "rootfs"
        self._rootfs = os.path.realpath(os.path.join(self._config.bundle, root))
        process = self._spec.get("process") or {}
        context = wasm_context.plan(self._spec)
        request = runner_request(process, self._rootfs, context)
        try:
            path = cgroup_path(self._spec, self._context.namespace, self._id)
            self._cgroup = ContainerCgroup(path)
            self._cgroup.create()
            record_in_pod(self._spec, self._config.bundle, path)
            self._cgroup.set_resources(self._spec.get("linux", {}).get("resources") or {})
        except (OSError, ValueError) as exc:
            raise TtrpcError(Code.UNKNOWN, f"cannot set up the container's cgroup: {exc}") from exc
        self._init, self._start_fd = await self._launch(
            self._id, request, context, self._config.stdio
        )
        pid_file = os.path.join(self._config.bundle, INIT_PID_FILE)
        with open(os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(str(self._init.pid))
        return self._init

    async def _launch(
        self, label: str, request: str, context: wasm_context.Context, stdio: ProcessStdio
    ) -> tuple[Launched, int]:
        """Start a runner in the cgroup and wait until its module is loaded; returns it and
        the write end of its start pipe."""
        assert self._cgroup is not None
        try:
            namespaces = wasm_context.open_namespaces(context["join"])
        except OSError as exc:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"cannot enter the container: {exc}"
            ) from exc
        with contextlib.ExitStack() as child_ends:
            for fd in namespaces:
                child_ends.callback(os.close, fd)
            report_read, report_write = os.pipe()
            start_read, start_write = os.pipe()
            master = None
            for fd in (report_write, start_read):
                child_ends.callback(os.close, fd)
            if stdio.terminal:
                master, slave = os.openpty()
                child_ends.callback(os.close, slave)
                fds = {0: slave, 1: slave, 2: slave}
            else:
                given = (stdio.stdin, stdio.stdout, stdio.stderr)
                fds = {target: fd for target, fd in enumerate(given) if fd is not None}
            pid, exited = fork_call(
                self._context.reaper,
                lambda: runner.run(request, label),
                fds={
                    **fds,
                    runner.REPORT_FD: report_write,
                    runner.START_FD: start_read,
                    **{runner.NAMESPACE_FD + i: fd for i, fd in enumerate(namespaces)},
                },
            )
        self._children[pid] = exited
        exited.add_done_callback(lambda _: self._children.pop(pid, None))
        reports = _Reports(report_read, label)
        try:
            try:
                self._cgroup.add(pid)
                problem = await asyncio.wait_for(reports.ready, READY_TIMEOUT)
            except OSError as exc:
                problem = f"cannot join the container's cgroup: {exc}"
            except TimeoutError:
                problem = f"not loaded within {READY_TIMEOUT} s"
            if problem is not None:
                raise TtrpcError(Code.UNKNOWN, f"wasm process not started: {problem}")
        except BaseException:  # cancelled too: nothing may outlive a failed create or exec
            self._abandon(pid, exited, start_write, master, reports)
            raise
        return Launched(pid=pid, exited=exited, console_master=master), start_write

    @staticmethod
    def _abandon(
        pid: int, exited: asyncio.Future[Any], start: int, master: int | None, reports: _Reports
    ) -> None:
        if not exited.done():  # the pid is ours until reaped: no reuse race
            os.kill(pid, signal.SIGKILL)
        for fd in (start, master):
            if fd is not None:
                os.close(fd)
        reports.close()

    async def start(self) -> Launched | None:
        if self._start_fd is not None:
            with contextlib.suppress(BrokenPipeError):  # died already: its exit is reported
                os.write(self._start_fd, b"\1")
            os.close(self._start_fd)
            self._start_fd = None
        return None

    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        if self._init is None or self._init.exited.done():
            raise TtrpcError(Code.FAILED_PRECONDITION, "the container's module has exited")
        # The namespaces the init was given afresh are joined by its /proc/PID/ns files:
        # _launch opens them at once, while the pid is still ours (not reaped).
        context = wasm_context.plan(self._spec, self._init.pid)
        request = runner_request(process, self._rootfs, context)
        launched, start = await self._launch(f"{self._id}/{exec_id}", request, context, stdio)
        with contextlib.suppress(BrokenPipeError):
            os.write(start, b"\1")
        os.close(start)
        return launched

    async def kill(self, signum: int, all_processes: bool) -> None:
        if self._init is None or self._init.exited.done():
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found")
        if all_processes and self._cgroup is not None:
            self._cgroup.signal_all(signum)
        else:
            os.kill(self._init.pid, signum)
        if signum == signal.SIGKILL and self._cgroup is not None:
            # As runc does: a frozen process acts on SIGKILL only once thawed, and a paused
            # task that is killed (docker kill, rm -f) ends without waiting for a Resume.
            await self._cgroup.set_frozen(False)

    async def delete(self, force: bool = False) -> None:
        if self._start_fd is not None:  # never started: the runner exits on the closed pipe
            os.close(self._start_fd)
            self._start_fd = None
        if self._cgroup is not None:
            self._cgroup.kill_all()
        for pid, exited in list(self._children.items()):
            if not exited.done():
                os.kill(pid, signal.SIGKILL)
        if self._children:
            await asyncio.wait(list(self._children.values()), timeout=DELETE_TIMEOUT)
        if self._cgroup is not None:
            try:
                self._cgroup.remove()
            except OSError as exc:
                raise TtrpcError(Code.UNKNOWN, f"cannot remove the cgroup: {exc}") from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._config.bundle, INIT_PID_FILE))

    def _require_cgroup(self) -> ContainerCgroup:
        if self._cgroup is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, "the container has no cgroup yet")
        return self._cgroup

    async def pause(self) -> None:
        await self._require_cgroup().set_frozen(True)

    async def resume(self) -> None:
        await self._require_cgroup().set_frozen(False)

    async def checkpoint(self, request: CheckpointRequest) -> None:
        raise NotImplementedError(NO_CHECKPOINT)

    async def pids(self) -> Sequence[int]:
        return self._require_cgroup().pids()

    async def update(self, resources: Mapping[str, Any]) -> None:
        refuse_unapplied(resources, "pywasm")
        try:
            self._require_cgroup().set_resources(resources)
        except OSError as exc:
            raise TtrpcError(Code.UNKNOWN, f"cannot update the cgroup: {exc}") from exc

    async def stats(self) -> Any:
        try:
            return self._require_cgroup().cgroup.stats()
        except OSError as exc:
            raise TtrpcError(Code.NOT_FOUND, f"cgroup does not exist: {exc}") from exc

    async def on_init_exit(self) -> None:
        # Like a container's pid namespace ending: execs do not outlive the init.
        if self._cgroup is not None:
            self._cgroup.signal_all(signal.SIGKILL)


class WasmRuntime(Runtime):
    def container(self, config: ContainerConfig) -> Container:
        if is_pod_sandbox(oci.read_spec(config.bundle)):
            return RuncRuntime(self.context).container(config)
        return WasmContainer(self, config)

    @classmethod
    def cleanup(cls, namespace: str, bundle: str, container_id: str) -> int:
        if is_pod_sandbox(oci.read_spec(bundle)):
            pid = RuncRuntime.cleanup(namespace, bundle, container_id)
            _remove_pod_modules(bundle)
            return pid
        try:
            spec = _load_spec(bundle)
            ContainerCgroup(cgroup_path(spec, namespace, container_id)).remove()
        except (TtrpcError, OSError, ValueError) as exc:
            log.warning("%s: cgroup cleanup: %s", container_id, exc)
        return recorded_init_pid(bundle)
