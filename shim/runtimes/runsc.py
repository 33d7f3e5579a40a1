"""The gVisor backend: drives runsc, whose containers run on a user-space kernel.

runsc speaks the OCI runtime CLI, so the commands are shared with runc (shim.runtimes.oci).
What differs lives here:

* Configuration comes the way gVisor users write it: runtime options
  ``runtimeoptions.v1.Options{config_path}`` (``ctr --runtime-config-path``, CRI ``ConfigPath``)
  naming a ``runsc.toml`` whose ``[runsc_config]`` table holds runsc flags.
* The init's pid is the sandbox process, which exits with the init's status (128 + signal for a
  signal death) once the init is gone; `runsc create` leaves it to us, the subreaper, so the
  reaper learns that exit. (`runsc wait` is not used for it: with this runsc, the sandbox exits
  before the wait's reply reaches it, and the status is lost.)
* A Kubernetes pod is one sandbox: runsc makes the pause container (CRI annotation
  ``container-type=sandbox``) the sandbox and every app container a sub-container of it. A
  sub-container's pid is the sandbox's (what runsc's pid file holds), its stdio is handed over
  at ``runsc start`` (not create), and its exit comes from ``runsc wait``, the sandbox living on;
  if the sandbox dies, its sub-containers exit with the sandbox's status.
* An exec's host pid is runsc's waiter, which does not forward signals: execs are signalled
  with ``runsc kill --pid <pid in the sandbox>``; ``runsc ps`` lists sandbox pids, which Pids
  maps to the host processes that carry them (the waiter or the sandbox).
* Stats come from ``runsc events --stats`` (the sandbox's own accounting).
* Memory limits and OOM: only the sandbox has a host cgroup (the pause container's), watched
  for every container of the pod, so an OOM kill of the sandbox is each one's TaskOOM. A
  sub-container's own memory limit is enforced by nobody (the sentry's memory cgroup limit is
  a stub), so it is never OOMKilled alone. Update is ``runsc update`` where runsc has it (newer
  gVisor). This runsc has none: a container that is its own sandbox (docker, ctr) gets the
  limits written into the sandbox's host cgroup; a pod's sub-container has no cgroup of its
  own, which Update reports as Unimplemented.
* Checkpoint always stops the container: this runsc's ``--leave-running`` never returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shim.runtimes import oci
from shim.runtimes.base import (
    CheckpointRequest,
    Container,
    ContainerConfig,
    Launched,
    ProcessStdio,
    Runtime,
)
from shim.runtimes.cri import CONTAINER_TYPE, SANDBOX_ID, annotation
from shim.runtimes.options import read_toml_config
from shim.sys.cgroup_limits import refuse_unapplied, set_resources
from shim.sys.cgroups import Cgroup
from shim.sys.reaper import Exit
from shim.sys.spawn import CommandResult
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

CONFIG_TYPE_URL = "io.containerd.runsc.v1.options"  # what gVisor's docs tell CRI users to set
DEFAULT_ROOT = "/run/containerd/runsc"
SANDBOX_EXIT_GRACE = 5.0  # how long a failed `runsc wait` waits for the sandbox's exit
INTERNAL_ERROR_STATUS = 128  # a sub-container's status when runsc cannot tell it (as gVisor's shim)
USAGE = b"Usage: runsc "  # what runsc prints for a command it does not have
CANNOT = {"update": "change a running container's resources (its pod shares one sandbox)"}
NO_STDIO = ProcessStdio(None, None, None, terminal=False)
# Flags naming files runsc writes: gVisor's shim expands %ID% in them and makes their dirs.
OUTPUT_PATH_FLAGS = ("debug-log", "panic-log", "pcap-log", "trace", "coverage-report")


@dataclass(frozen=True)
class RunscOptions(oci.CliOptions):
    binary_name: str = "runsc"
    root: str = DEFAULT_ROOT
    flags: dict[str, str] = field(default_factory=dict)  # runsc flag name -> value

    def extra_global_args(self) -> list[str]:
        return [f"--{name}={value}" for name, value in self.flags.items()]

    @classmethod
    def for_container(
        cls, options: Any | None, container_id: str, spec: Mapping[str, Any]
    ) -> RunscOptions:
        config = read_config(options)
        table = config.get("runsc_config", {})
        if not isinstance(table, dict):
            raise TtrpcError(Code.INVALID_ARGUMENT, "runsc_config must be a table of runsc flags")
        flags = {
            name: _flag_value(value).replace("%ID%", container_id) for name, value in table.items()
        }
        if "network" not in flags and not _has_network_namespace_path(spec):
            # A sandbox network needs a namespace set up for it (CNI); without one, runsc
            # refuses to start ("network enabled in root network namespace").
            flags["network"] = "none"
        return cls(
            binary_name=str(config.get("binary_name") or "runsc"),
            root=str(config.get("root") or DEFAULT_ROOT),
            flags=flags,
        )


def read_config(options: Any | None) -> dict[str, Any]:
    """The runsc.toml that runtime options point to; {} without one."""
    return read_toml_config(options, ("", CONFIG_TYPE_URL), "runsc config")


def _flag_value(value: object) -> str:
    if isinstance(value, bool):  # TOML true -> Go's flag syntax
        return "true" if value else "false"
    return str(value)


def _has_network_namespace_path(spec: Mapping[str, Any]) -> bool:
    namespaces = spec.get("linux", {}).get("namespaces", [])
    return any(ns.get("type") == "network" and ns.get("path") for ns in namespaces)


def sandbox_of(container_id: str, spec: Mapping[str, Any]) -> str | None:
    """The id of the sandbox a CRI app container joins as a sub-container; None for a
    container that is (or has) its own sandbox."""
    sandbox_id = annotation(spec, SANDBOX_ID)  # runsc reads these two itself
    if annotation(spec, CONTAINER_TYPE) != "container" or not sandbox_id:
        return None
    return None if sandbox_id == container_id else str(sandbox_id)


def wait_status(result: CommandResult) -> int | None:
    """The exit status `runsc wait` printed, None if it could not wait."""
    if result.status != 0:
        return None
    try:
        status = json.loads(result.stdout)["exitStatus"]
    except (ValueError, TypeError, KeyError):
        return None
    return status if isinstance(status, int) else None


def _duplicate(stdio: ProcessStdio) -> ProcessStdio:
    copies: list[int | None] = []
    try:
        for fd in (stdio.stdin, stdio.stdout, stdio.stderr):
            copies.append(None if fd is None else os.dup(fd))
    except OSError:
        for copy in copies:
            if copy is not None:
                os.close(copy)
        raise
    stdin, stdout, stderr = copies
    return ProcessStdio(stdin, stdout, stderr, stdio.terminal)


def _close(stdio: ProcessStdio) -> None:
    for fd in (stdio.stdin, stdio.stdout, stdio.stderr):
        if fd is not None:
            os.close(fd)


def _make_output_dirs(flags: Mapping[str, str]) -> None:
    """runsc writes its logs but does not make their directories (a value ending in "/" is a
    directory runsc fills with one file per command)."""
    for name in OUTPUT_PATH_FLAGS:
        path = flags.get(name)
        if path:
            os.makedirs(path if path.endswith("/") else os.path.dirname(path), exist_ok=True)


class SubcontainerExit:
    """A sub-container's exit: what `runsc wait` says, else the sandbox's, if it died."""

    def __init__(self, pid: int, sandbox_exited: asyncio.Future[Exit]) -> None:
        self.pid = pid
        self.future: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self._sandbox_exited = sandbox_exited
        self._waiter: asyncio.Task[None] | None = None
        sandbox_exited.add_done_callback(self._on_sandbox_exit)

    def follow(
        self, wait: Awaitable[CommandResult], kill_all: Callable[[], Awaitable[object]]
    ) -> None:
        """The container runs: take its exit from `wait` (a `runsc wait`)."""
        self._waiter = asyncio.get_running_loop().create_task(self._wait(wait, kill_all))

    def close(self) -> None:
        """The container is deleted: whatever still waits for it learns it was killed."""
        if self._waiter is not None:
            self._waiter.cancel()
        self._set(128 + signal.SIGKILL)

    async def _wait(
        self, wait: Awaitable[CommandResult], kill_all: Callable[[], Awaitable[object]]
    ) -> None:
        status: int | None = INTERNAL_ERROR_STATUS
        try:
            status = wait_status(await wait)
            if status is None:  # runsc could not ask the sandbox: it died, with the container
                status = await self._sandbox_status()
                if status is None:
                    log.warning("runsc wait failed with the sandbox still running: killing")
                    status = INTERNAL_ERROR_STATUS
                    await kill_all()
        except Exception:
            # Whatever went wrong, the exit is still published: a Wait must not hang.
            log.exception("waiting for a sub-container")
        self._set(INTERNAL_ERROR_STATUS if status is None else status)

    async def _sandbox_status(self) -> int | None:
        await asyncio.wait([self._sandbox_exited], timeout=SANDBOX_EXIT_GRACE)
        if not self._sandbox_exited.done() or self._sandbox_exited.cancelled():
            return None
        return self._sandbox_exited.result().status

    def _on_sandbox_exit(self, sandbox_exited: asyncio.Future[Exit]) -> None:
        # A started container's waiter sees the death too, and may yet get a real status.
        if self._waiter is None and not sandbox_exited.cancelled():
            self._set(sandbox_exited.result().status)

    def _set(self, status: int) -> None:
        if not self.future.done():
            self.future.set_result(Exit(self.pid, status, time.time_ns()))


@dataclass(frozen=True)
class _Exec:
    host_pid: int  # runsc's waiter: the pid containerd knows
    sandbox_pid: int


class RunscContainer(oci.OciCliContainer):
    options: RunscOptions

    def __init__(self, runtime: RunscRuntime, config: ContainerConfig) -> None:
        spec = oci.read_spec(config.bundle)
        options = RunscOptions.for_container(config.options, config.id, spec)
        _make_output_dirs(options.flags)
        super().__init__(runtime, config, options)
        self._execs: dict[str, _Exec] = {}
        self._paused = False
        self._sandbox_id = sandbox_of(config.id, spec)
        self._exit: SubcontainerExit | None = None  # a sub-container's, once created
        self._start_stdio: ProcessStdio | None = None  # kept from create to start

    def _takes_stdio_at_start(self) -> bool:
        # A sub-container's pty is made at create; its pipes are handed over at start.
        return self._sandbox_id is not None and not self._config.stdio.terminal

    def _create_stdio(self) -> ProcessStdio:
        if self._takes_stdio_at_start():
            return NO_STDIO
        return super()._create_stdio()

    async def create(self) -> Launched | None:
        if self._takes_stdio_at_start():
            # Our own copies: the service closes its runtime ends once create returns.
            self._start_stdio = _duplicate(self._config.stdio)
        launched = await super().create()
        if launched is None or self._sandbox_id is None:
            return launched
        # launched: the sandbox's pid (runsc's pid file) and the sandbox's exit.
        self._exit = SubcontainerExit(launched.pid, launched.exited)
        return Launched(launched.pid, self._exit.future, launched.console_master)

    async def start(self) -> Launched | None:
        if self._exit is None:
            return await super().start()
        try:
            with oci.stdio_fds(self._start_stdio or NO_STDIO) as fds:
                result = await self._cli("start", self._id, fds=fds)
        finally:
            self._close_start_stdio()
        self._raise_if_failed("start", result)
        self._exit.follow(
            self._cli("wait", self._id), lambda: self._cli("kill", "--all", self._id, "9")
        )
        return None

    async def delete(self, force: bool = False) -> None:
        self._close_start_stdio()
        if self._exit is not None:
            self._exit.close()
        await super().delete(force)

    def _close_start_stdio(self) -> None:
        if self._start_stdio is not None:
            _close(self._start_stdio)
            self._start_stdio = None

    def _raise_if_failed(self, operation: str, result: CommandResult) -> None:
        if result.status != 0 and result.stderr.startswith(USAGE):
            binary = self.options.binary_name
            what = CANNOT.get(operation, f"{operation} a container")
            message = f"{binary} has no `{operation}` command: this gVisor cannot {what}"
            raise TtrpcError(Code.UNIMPLEMENTED, message)
        super()._raise_if_failed(operation, result)

    def _exec_flags(self, exec_id: str) -> list[str]:
        return ["--internal-pid-file", self._pid_file(f"{exec_id}-sandbox")]

    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        launched = await super().exec(exec_id, process, stdio)
        sandbox_pid_file = self._pid_file(f"{exec_id}-sandbox")
        self._execs[exec_id] = _Exec(launched.pid, oci.read_pid(sandbox_pid_file))
        os.unlink(sandbox_pid_file)
        launched.exited.add_done_callback(lambda _: self._execs.pop(exec_id, None))
        return launched

    async def kill(self, signal: int, all_processes: bool) -> None:
        await self._resume_to_signal(signal)
        await super().kill(signal, all_processes)

    async def kill_exec(self, exec_id: str, signal: int) -> bool:
        process = self._execs.get(exec_id)
        if process is None:
            return False
        await self._resume_to_signal(signal)
        await self._signal(["kill", "--pid", str(process.sandbox_pid), self._id, str(signal)])
        return True

    async def _resume_to_signal(self, signum: int) -> None:
        """runsc cannot signal a paused sandbox ("cannot signal container in state paused").
        SIGKILL resumes it first: the process dies at once, as a frozen runc container's does
        when thawed (docker kill and rm -f of a paused container). Any other signal would let
        the container run, so it is refused."""
        if not self._paused:
            return
        if signum != signal.SIGKILL:
            raise TtrpcError(
                Code.FAILED_PRECONDITION,
                f"gVisor cannot signal a paused container: resume {self._id} first",
            )
        await self.resume()

    async def pids(self) -> Sequence[int]:
        """The host processes that carry the container's processes: an exec's waiter for the
        exec, the sandbox for any other. A pid inside the sandbox means nothing on the host,
        and a host tool given one (docker top runs `ps -q`) would show or signal an unrelated
        process."""
        waiters = {p.sandbox_pid: p.host_pid for p in self._execs.values()}
        carriers = [waiters.get(pid, self._pid) for pid in await super().pids()]
        return list(dict.fromkeys(carriers))

    async def update(self, resources: Mapping[str, Any]) -> None:
        try:
            await super().update(resources)
        except TtrpcError as error:
            if error.code != Code.UNIMPLEMENTED or self._sandbox_id is not None:
                raise
            # This runsc has no `update`. A container that is its own sandbox is all of its
            # sandbox's host cgroup, so the limits go there, as runc would write them.
            refuse_unapplied(resources, "pyrunsc")
            try:
                set_resources(Cgroup.for_pid(self._pid), resources)
            except OSError as exc:
                message = f"cannot update the sandbox's cgroup: {exc}"
                raise TtrpcError(Code.UNKNOWN, message) from exc

    async def pause(self) -> None:
        await super().pause()
        self._paused = True

    async def resume(self) -> None:
        await super().resume()
        self._paused = False

    async def stats(self) -> Any:
        output = await self._checked("events", "events", "--stats", self._id)
        try:
            event = json.loads(output)
        except ValueError as exc:
            raise TtrpcError(Code.UNKNOWN, f"runsc events printed no stats: {exc}") from exc
        if not isinstance(event, dict) or event.get("type") != "stats":
            raise TtrpcError(Code.UNKNOWN, f"runsc events printed no stats: {output[:200]!r}")
        return metrics_from_runsc(event.get("data") or {}, _cgroup_version())

    async def checkpoint(self, request: CheckpointRequest) -> None:
        options = oci.checkpoint_options(request)
        if self._paused:
            # containerd pauses a task before checkpointing it; runsc then panics
            # ("paused => stopped") and kills the sandbox.
            await self.resume()
        if not options.exit:
            log.warning("%s: runsc cannot leave a checkpointed container running", self._id)
        image = options.image_path or request.path
        await self._checked("checkpoint", "checkpoint", "--image-path", image, self._id)


def metrics_from_runsc(stats: Mapping[str, Any], cgroup_version: int) -> Any:
    """`runsc events --stats` data (runc's Stats JSON) as containerd's cgroups Metrics of the
    host's cgroup version, which is what `ctr task metrics` decodes."""
    from google.protobuf.any_pb2 import Any as AnyProto

    from shim.sys.cgroups import V1_METRICS_URL, V2_METRICS_URL

    cpu = stats.get("cpu", {}).get("usage", {})
    memory = stats.get("memory", {})
    pids = stats.get("pids", {})
    if cgroup_version == 2:
        from shim.api.cgroups.v2 import metrics_pb2 as v2

        v2_metrics = v2.Metrics()
        v2_metrics.cpu.usage_usec = cpu.get("total", 0) // 1000
        v2_metrics.cpu.user_usec = cpu.get("user", 0) // 1000
        v2_metrics.cpu.system_usec = cpu.get("kernel", 0) // 1000
        v2_metrics.memory.usage = memory.get("usage", {}).get("usage", 0)
        v2_metrics.memory.usage_limit = memory.get("usage", {}).get("limit", 0)
        v2_metrics.memory.swap_usage = memory.get("swap", {}).get("usage", 0)
        v2_metrics.memory.swap_limit = memory.get("swap", {}).get("limit", 0)
        v2_metrics.pids.current = pids.get("current", 0)
        v2_metrics.pids.limit = pids.get("limit", 0)
        return AnyProto(type_url=V2_METRICS_URL, value=v2_metrics.SerializeToString())
    from shim.api.cgroups.v1 import metrics_pb2 as v1

    metrics = v1.Metrics()
    metrics.cpu.usage.total = cpu.get("total", 0)
    metrics.cpu.usage.kernel = cpu.get("kernel", 0)
    metrics.cpu.usage.user = cpu.get("user", 0)
    metrics.cpu.usage.per_cpu.extend(cpu.get("percpu") or [])
    # Docker reads every one of these sub-messages without a nil check (dockerd panics on
    # `docker stats` otherwise), as runc's shim always sends them.
    throttling = stats.get("cpu", {}).get("throttling", {})
    metrics.cpu.throttling.periods = throttling.get("periods", 0)
    metrics.cpu.throttling.throttled_periods = throttling.get("throttledPeriods", 0)
    metrics.cpu.throttling.throttled_time = throttling.get("throttledTime", 0)
    metrics.memory.cache = memory.get("cache", 0)
    entries = (
        ("usage", metrics.memory.usage),
        ("swap", metrics.memory.swap),
        ("kernel", metrics.memory.kernel),
        ("kernelTCP", metrics.memory.kernel_tcp),
    )
    for name, entry in entries:
        values = memory.get(name, {})
        entry.limit = values.get("limit", 0)
        entry.usage = values.get("usage", 0)
        entry.max = values.get("max", 0)
        entry.failcnt = values.get("failcnt", 0)
    metrics.pids.current = pids.get("current", 0)
    metrics.pids.limit = pids.get("limit", 0)
    return AnyProto(type_url=V1_METRICS_URL, value=metrics.SerializeToString())


def _cgroup_version() -> int:
    # Like shim.sys.cgroups: only a pure unified hierarchy is v2.
    return 2 if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else 1


class RunscRuntime(Runtime):
    def container(self, config: ContainerConfig) -> Container:
        return RunscContainer(self, config)

    @classmethod
    def cleanup(cls, namespace: str, bundle: str, container_id: str) -> int:
        return oci.cleanup(RunscOptions.load(bundle), namespace, bundle, container_id)
