"""The gVisor backend: drives runsc, whose containers run on a user-space kernel.

runsc speaks the OCI runtime CLI, so the commands are shared with runc (shim.runtimes.oci).
What differs lives here:

* Configuration comes the way gVisor users write it: runtime options
  ``runtimeoptions.v1.Options{config_path}`` (``ctr --runtime-config-path``, CRI ``ConfigPath``)
  naming a ``runsc.toml`` whose ``[runsc_config]`` table holds runsc flags.
* The init's pid is the sandbox process, which exits with the init's status (128 + signal for a
  signal death) once the init is gone; `runsc create` leaves it to us, the subreaper, so the
  reaper learns that exit. (`runsc wait` is not used: with this runsc, the sandbox exits before
  the wait's reply reaches it, and the status is lost.)
* An exec's host pid is runsc's waiter, which does not forward signals: execs are signalled
  with ``runsc kill --pid <pid in the sandbox>``; ``runsc ps`` lists sandbox pids, which Pids
  maps back to the pids containerd knows.
* Stats come from ``runsc events --stats`` (the sandbox's own accounting).
* Checkpoint always stops the container: this runsc's ``--leave-running`` never returns.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Mapping, Sequence
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
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

OPTIONS_URL = "runtimeoptions.v1.Options"
CONFIG_TYPE_URL = "io.containerd.runsc.v1.options"  # what gVisor's docs tell CRI users to set
DEFAULT_ROOT = "/run/containerd/runsc"
SANDBOX_INIT_PID = 1  # the init's pid inside its sandbox
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
    """The runsc.toml that runtime options point to; {} without one. Other option types are
    ignored (a shim must tolerate them); a named file that cannot be read is an error."""
    if options is None or options.type_url != OPTIONS_URL:
        if options is not None and options.type_url:
            log.info("ignoring runtime options of type %s", options.type_url)
        return {}
    from shim.api.runtimeoptions.v1.api_pb2 import Options

    decoded = Options.FromString(options.value)
    if not decoded.config_path:
        return {}
    if decoded.type_url not in ("", CONFIG_TYPE_URL):
        log.info("ignoring config file %s of type %s", decoded.config_path, decoded.type_url)
        return {}
    try:
        with open(decoded.config_path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TtrpcError(
            Code.INVALID_ARGUMENT, f"runsc config {decoded.config_path}: {exc}"
        ) from exc


def _flag_value(value: object) -> str:
    if isinstance(value, bool):  # TOML true -> Go's flag syntax
        return "true" if value else "false"
    return str(value)


def _has_network_namespace_path(spec: Mapping[str, Any]) -> bool:
    namespaces = spec.get("linux", {}).get("namespaces", [])
    return any(ns.get("type") == "network" and ns.get("path") for ns in namespaces)


def _make_output_dirs(flags: Mapping[str, str]) -> None:
    """runsc writes its logs but does not make their directories (a value ending in "/" is a
    directory runsc fills with one file per command)."""
    for name in OUTPUT_PATH_FLAGS:
        path = flags.get(name)
        if path:
            os.makedirs(path if path.endswith("/") else os.path.dirname(path), exist_ok=True)


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

    def _exec_flags(self, exec_id: str) -> list[str]:
        return ["--internal-pid-file", self._pid_file(f"{exec_id}-sandbox")]

    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        launched = await super().exec(exec_id, process, stdio)
        sandbox_pid_file = self._pid_file(f"{exec_id}-sandbox")
        self._execs[exec_id] = _Exec(launched.pid, oci.read_pid(sandbox_pid_file))
        os.unlink(sandbox_pid_file)
        launched.exited.add_done_callback(lambda _: self._execs.pop(exec_id, None))
        return launched

    async def kill_exec(self, exec_id: str, signal: int) -> bool:
        process = self._execs.get(exec_id)
        if process is None:
            return False
        await self._signal(["kill", "--pid", str(process.sandbox_pid), self._id, str(signal)])
        return True

    async def pids(self) -> Sequence[int]:
        """The container's processes, by the pids containerd knows where they have one (the
        init: the sandbox; an exec: its waiter), else by their pid in the sandbox."""
        known = {SANDBOX_INIT_PID: self._pid}
        known.update({p.sandbox_pid: p.host_pid for p in self._execs.values()})
        return [known.get(pid, pid) for pid in await super().pids()]

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
