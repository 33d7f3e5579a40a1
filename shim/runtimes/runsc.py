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
  runsc checkpoints and restores a whole sandbox, so a pod's container (CRI's
  CheckpointContainer, or a restore into another pod) is refused as Unimplemented: the
  checkpoint would stop the pod.
* The network: a container with a network namespace to join (CNI) gets gVisor's netstack
  (runsc's default ``network=sandbox``) unless runsc.toml says otherwise; one with no network
  namespace in its spec (hostNetwork, ``--net-host``) the host's (``network=host``); one with a
  new namespace only loopback (``none``), unless the spec has hooks that run before the
  container does (Docker's bridge: its libnetwork-setkey prestart hook puts a veth into the
  namespace runsc makes, and runsc runs it before it copies the interfaces). runsc before
  release-20240807.0 takes any netns showing /proc/sys/net/core/rmem_default for the host's
  and refuses to start the sandbox, and Linux 6.11 and later show that file in every netns
  (gVisor issue 10704; fixed upstream by checking dev_weight instead, commit 19f6b0c07): that
  is probed in the pod's netns (or a new one) before `runsc create`, and either the
  runsc.toml's ``network_fallback`` is used or Create fails saying why.
* runsc opens a container's state lock (``<id>_sandbox:<sandbox>.lock``) with O_CREAT once it
  has seen the state file, and its ``delete`` removes both: a command that saw the state just
  before (a sub-container's start or delete loads every container of its sandbox) recreates
  the lock after it. The shim serves one pod, so a container's Delete waits for the pod's
  runsc commands under way when its state went, then removes a lock left without a state.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shim.runtimes import oci, runsc_spec
from shim.runtimes.base import (
    CheckpointRequest,
    Container,
    ContainerConfig,
    Launched,
    ProcessStdio,
    Runtime,
    ShimContext,
)
from shim.runtimes.cri import CONTAINER_TYPE, SANDBOX_ID, annotation
from shim.runtimes.options import config_path, read_toml_config
from shim.runtimes.spec import network_namespace
from shim.sys.cgroup_limits import refuse_unapplied, set_resources
from shim.sys.cgroups import Cgroup
from shim.sys.namespaces import CLONE_NEWNET, setns, unshare
from shim.sys.reaper import Exit, Reaper
from shim.sys.spawn import CommandResult, fork_call, run_command
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

CONFIG_TYPE_URL = "io.containerd.runsc.v1.options"  # what gVisor's docs tell CRI users to set
DEFAULT_ROOT = "/run/containerd/runsc"
SANDBOX_EXIT_GRACE = 5.0  # how long a failed `runsc wait` waits for the sandbox's exit
COMMANDS_SETTLE_TIMEOUT = 5.0  # how long a Delete waits for the pod's runsc commands under way
INTERNAL_ERROR_STATUS = 128  # a sub-container's status when runsc cannot tell it (as gVisor's shim)
USAGE = b"Usage: runsc "  # what runsc prints for a command it does not have
CANNOT = {"update": "change a running container's resources (its pod shares one sandbox)"}
NO_STDIO = ProcessStdio(None, None, None, terminal=False)
# Flags naming files runsc writes: gVisor's shim expands %ID% in them and makes their dirs.
OUTPUT_PATH_FLAGS = ("debug-log", "panic-log", "pcap-log", "trace", "coverage-report")
NETWORK_FALLBACKS = ("host", "none")  # what runsc.toml's network_fallback may name
# gVisor's first release whose root-netns check reads dev_weight, not rmem_default (issue 10704).
FIXED_RELEASE = 20240807
# gVisor's first release whose `runsc exec` applies the container's seccomp (--oci-seccomp) to
# the process it starts (gVisor commit 028b7f0f1); before it execs run unconfined.
EXEC_SECCOMP_RELEASE = 20260330
RMEM_DEFAULT = "/proc/sys/net/core/rmem_default"  # this runsc's "root netns" sign
DEV_WEIGHT = "/proc/sys/net/core/dev_weight"  # in the initial netns only, on every kernel
# The netns probe's exit codes.
NETNS_USABLE, NETNS_MISJUDGED, NETNS_INITIAL, NETNS_UNREADABLE = 0, 10, 11, 12
VERSION_TIMEOUT = 10.0
ROOT_NETNS_REFUSAL = "cannot run with network enabled in root network namespace"


@dataclass(frozen=True)
class RunscOptions(oci.CliOptions):
    binary_name: str = "runsc"
    root: str = DEFAULT_ROOT
    flags: dict[str, str] = field(default_factory=dict)  # runsc flag name -> value
    # The network mode for a netns this runsc's netstack refuses by mistake ("" = fail).
    network_fallback: str = ""
    config_path: str = ""  # the runsc.toml, for messages

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
        if "network" not in flags:
            mode = _network_mode(spec)
            if mode is not None:
                flags["network"] = mode
        fallback = str(config.get("network_fallback") or "")
        if fallback and fallback not in NETWORK_FALLBACKS:
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                f"network_fallback = {fallback!r}: must be one of {', '.join(NETWORK_FALLBACKS)}",
            )
        return cls(
            binary_name=str(config.get("binary_name") or "runsc"),
            root=str(config.get("root") or DEFAULT_ROOT),
            flags=flags,
            network_fallback=fallback,
            config_path=config_path(options) if config else "",
        )


def read_config(options: Any | None) -> dict[str, Any]:
    """The runsc.toml that runtime options point to; {} without one."""
    return read_toml_config(options, ("", CONFIG_TYPE_URL), "runsc config")


def _flag_value(value: object) -> str:
    if isinstance(value, bool):  # TOML true -> Go's flag syntax
        return "true" if value else "false"
    return str(value)


def _network_mode(spec: Mapping[str, Any]) -> str | None:
    """runsc's network mode for the spec's network namespace, None for runsc's default."""
    path = network_namespace(spec)
    if path is None:
        # The host's network (CRI hostNetwork, ctr --net-host), as runc shares it. runsc's
        # default would copy the host's interfaces into its netstack, and refuse to.
        return "host"
    hooks = spec.get("hooks") or {}
    if not path and not (hooks.get("prestart") or hooks.get("createRuntime")):
        # A new namespace that nothing sets up: loopback only, which is all `none` gives.
        return "none"
    # A namespace set up for the container, by CNI (a path) or by a hook (Docker's bridge):
    # gVisor's netstack copies what is in it.
    return None


def _probe_netns(path: str) -> int:
    """In a fork: whether this runsc's root-netns check (rmem_default) misjudges the netns at
    `path`, or without one, a new netns (the one runsc makes for a hook to set up)."""
    try:
        if path:
            setns(os.open(path, os.O_RDONLY | os.O_CLOEXEC), CLONE_NEWNET)
        else:
            unshare(CLONE_NEWNET)
    except OSError:
        return NETNS_UNREADABLE
    if os.path.exists(DEV_WEIGHT):
        return NETNS_INITIAL  # runsc is right to refuse it
    return NETNS_MISJUDGED if os.path.exists(RMEM_DEFAULT) else NETNS_USABLE


async def netns_misjudged(reaper: Reaper, path: str) -> bool:
    """Whether the netns at `path` (or a new one, without a path) shows rmem_default without
    being the initial netns. A fork, not a thread of the daemon: setns changes the calling
    thread for good."""
    _, exited = fork_call(reaper, lambda: _probe_netns(path), fds={})
    status = (await exited).status
    if status not in (NETNS_USABLE, NETNS_MISJUDGED, NETNS_INITIAL):
        log.warning("cannot probe the network namespace %s (status %d)", path, status)
    return status == NETNS_MISJUDGED


_releases: dict[str, int | None] = {}  # runsc binary -> its release date, per daemon


def release_date(version_output: str) -> int | None:
    """The release date in `runsc --version`'s output: upstream's "release-20240807.0",
    Debian's "0.0~20221219.0"; None for a build without one."""
    match = re.search(r"runsc version \S*?(\d{8})\.\d+", version_output)
    return int(match.group(1)) if match else None


async def runsc_release(reaper: Reaper, binary: str) -> int | None:
    if binary not in _releases:
        try:
            result = await run_command(reaper, [binary, "--version"], timeout=VERSION_TIMEOUT)
            _releases[binary] = release_date(result.stdout.decode(errors="replace"))
        except (OSError, TimeoutError) as exc:
            log.warning("%s --version: %s", binary, exc)
            return None
    return _releases[binary]


def netstack_refused_message(binary: str, release: int | None, config: str) -> str:
    where = f"in {config}" if config else "in the runsc.toml of the runtime options"
    runsc = f"this runsc ({binary}, release {release})" if release else f"this runsc ({binary})"
    return (
        "gVisor's network stack (runsc network=sandbox) cannot start in the container's "
        f"network namespace: {runsc} takes any namespace that shows {RMEM_DEFAULT} for the host's, "
        "and this kernel (Linux 6.11 or later) shows it in every one (gVisor issue 10704, "
        "fixed in release-20240807.0). Upgrade runsc, or choose a mode " + where + ": "
        'network_fallback = "host" (top level: the host kernel\'s network stack in that '
        'namespace, weaker isolation, only where the netstack cannot run) or "none" '
        '(loopback only), or network = "host" under [runsc_config] (always)'
    )


def sandbox_of(container_id: str, spec: Mapping[str, Any]) -> str | None:
    """The id of the sandbox a CRI app container joins as a sub-container; None for a
    container that is (or has) its own sandbox."""
    sandbox_id = annotation(spec, SANDBOX_ID)  # runsc reads these two itself
    if annotation(spec, CONTAINER_TYPE) != "container" or not sandbox_id:
        return None
    return None if sandbox_id == container_id else str(sandbox_id)


def whole_sandbox_only(operation: str, sandbox_id: str) -> str:
    """Why a container of a pod cannot be checkpointed or restored on its own."""
    return (
        f"{operation} of one container of the gVisor pod {sandbox_id}: runsc checkpoints and "
        "restores whole sandboxes (its checkpoint would stop every container of the pod)"
    )


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

    def kill_unstarted(self, signum: int) -> None:
        """A signal before the start: the container ends without having run."""
        if self._waiter is None:
            self._set(128 + signum)

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


class RunscCommands:
    """The runsc commands of a shim's containers under way, but for `runsc wait`: it reads
    its container's state as it begins only, then lasts as long as the container."""

    def __init__(self) -> None:
        self._running: set[asyncio.Future[None]] = set()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running.add(done)
        try:
            yield
        finally:
            self._running.discard(done)
            done.set_result(None)

    async def settle(self, timeout: float) -> None:
        """Wait for the commands under way now (not for those begun later)."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)


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
        self._commands = runtime.commands
        self._execs: dict[str, _Exec] = {}
        self._paused = False
        self._sandbox_id = sandbox_of(config.id, spec)
        self._netns = network_namespace(spec) or ""  # "" for a new one or the host's
        # A profile runsc applies: the first exec warns if this runsc leaves execs out of it.
        oci_seccomp = options.flags.get("oci-seccomp", "false") in runsc_spec.GO_TRUE
        self._check_exec_seccomp = oci_seccomp and bool(spec.get("linux", {}).get("seccomp"))
        self._exit: SubcontainerExit | None = None  # a sub-container's, once created
        self._sandbox_exited: asyncio.Future[Exit] | None = None  # an own sandbox's, once created
        self._started = False
        self._start_stdio: ProcessStdio | None = None  # kept from create to start

    def _takes_stdio_at_start(self) -> bool:
        # A sub-container's pty is made at create; its pipes are handed over at start.
        return self._sandbox_id is not None and not self._config.stdio.terminal

    def _create_stdio(self) -> ProcessStdio:
        if self._takes_stdio_at_start():
            return NO_STDIO
        return super()._create_stdio()

    async def create(self) -> Launched | None:
        if self._config.checkpoint and self._sandbox_id is not None:
            raise NotImplementedError(whole_sandbox_only("restore", self._sandbox_id))
        await self._adapt_spec()
        await self._choose_network()
        if self._takes_stdio_at_start():
            # Our own copies: the service closes its runtime ends once create returns.
            self._start_stdio = _duplicate(self._config.stdio)
        launched = await super().create()
        if launched is None:
            return None
        if self._sandbox_id is None:
            self._sandbox_exited = launched.exited
            return launched
        # launched: the sandbox's pid (runsc's pid file) and the sandbox's exit.
        self._exit = SubcontainerExit(launched.pid, launched.exited)
        return Launched(launched.pid, self._exit.future, launched.console_master)

    async def _adapt_spec(self) -> None:
        """The bundle's spec as this runsc can take it (shim.runtimes.runsc_spec)."""
        spec = oci.read_spec(self._bundle)
        if not spec:
            return  # runsc create says what is wrong with it
        options = self.options
        runsc_spec.warn_unapplied_seccomp(spec, options.flags, self._id, options.config_path)
        process = spec.get("process") or {}
        binary = options.binary_name
        changed = await runsc_spec.adapt_capabilities(process, binary, self._id, "container")
        # Before readonly_binds, which repeats the mounts below each path it binds.
        changed = runsc_spec.submount_binds(spec) or changed
        changed = runsc_spec.readonly_binds(spec, self._bundle, self._id) or changed
        changed = runsc_spec.masked_paths(spec, self._bundle, self._id) or changed
        if changed:
            runsc_spec.write_spec(self._bundle, spec)

    async def _choose_network(self) -> None:
        """Before `runsc create`: keep gVisor's netstack unless this runsc would refuse the
        pod's netns by mistake; then the configured fallback, else a clear error (for a new
        netns that a hook sets up, loopback only and a warning). A pod's
        sub-containers decide alike, so that every runsc command of the pod has one mode."""
        options = self.options
        if options.flags.get("network", "sandbox") != "sandbox":
            return
        reaper = self._context.reaper
        if not await netns_misjudged(reaper, self._netns):
            return
        release = await runsc_release(reaper, options.binary_name)
        # A fixed runsc, or a build without a date (then runsc's own refusal is explained).
        if release is None or release >= FIXED_RELEASE:
            return
        fallback = options.network_fallback
        if not fallback:
            message = netstack_refused_message(options.binary_name, release, options.config_path)
            if self._netns:
                raise TtrpcError(Code.FAILED_PRECONDITION, message)
            # A new netns for a hook to set up (Docker, whose `--network none` has the hook
            # too): loopback only, as this shim gave such containers before hooks counted.
            fallback = "none"
            log.warning("%s: %s; the container gets loopback only", self._id, message)
        log.info(
            "%s: runsc %d would refuse the netns %s (gVisor issue 10704): network=%s",
            self._id, release, self._netns or "(new)", fallback,
        )  # fmt: skip
        flags = {**options.flags, "network": fallback}
        self.options = replace(options, flags=flags)
        self.options.save(self._bundle)

    async def start(self) -> Launched | None:
        if self._exit is None:
            launched = await super().start()
            if launched is not None:  # restored: the sandbox is new
                self._sandbox_exited = launched.exited
            self._started = True
            return launched
        try:
            with oci.stdio_fds(self._start_stdio or NO_STDIO) as fds:
                result = await self._cli("start", self._id, fds=fds)
        finally:
            self._close_start_stdio()
        self._raise_if_failed("start", result)
        self._started = True
        self._exit.follow(
            self._cli("wait", self._id), lambda: self._cli("kill", "--all", self._id, "9")
        )
        return None

    async def _cli(
        self, *args: str, input: bytes | None = None, fds: Mapping[int, int] | None = None
    ) -> CommandResult:
        if args[0] == "wait":
            return await super()._cli(*args, input=input, fds=fds)
        with self._commands.running():
            return await super()._cli(*args, input=input, fds=fds)

    async def delete(self, force: bool = False) -> None:
        self._close_start_stdio()
        if self._exit is not None:
            self._exit.close()
        await super().delete(force)
        # A command of the pod that saw the state before it went may yet recreate the lock.
        await self._commands.settle(COMMANDS_SETTLE_TIMEOUT)
        root = os.path.join(self.options.root, self._context.namespace)
        files = os.path.join(root, f"{self._id}_sandbox:{self._sandbox_id or self._id}")
        if not os.path.exists(f"{files}.state"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{files}.lock")

    def _close_start_stdio(self) -> None:
        if self._start_stdio is not None:
            _close(self._start_stdio)
            self._start_stdio = None

    def _raise_if_failed(self, operation: str, result: CommandResult) -> None:
        if result.status != 0 and ROOT_NETNS_REFUSAL in oci.last_runtime_error(
            self._bundle, result
        ):
            # A runsc whose version the probe could not judge refused the netns anyway.
            options = self.options
            message = netstack_refused_message(options.binary_name, None, options.config_path)
            raise TtrpcError(Code.FAILED_PRECONDITION, f"OCI runtime {operation} failed: {message}")
        if result.status != 0 and result.stderr.startswith(USAGE):
            binary = self.options.binary_name
            what = CANNOT.get(operation, f"{operation} a container")
            message = f"{binary} has no `{operation}` command: this gVisor cannot {what}"
            raise TtrpcError(Code.UNIMPLEMENTED, message)
        super()._raise_if_failed(operation, result)

    def _exec_flags(self, exec_id: str) -> list[str]:
        return ["--internal-pid-file", self._pid_file(f"{exec_id}-sandbox")]

    async def _warn_of_unconfined_execs(self) -> None:
        binary = self.options.binary_name
        release = await runsc_release(self._context.reaper, binary)
        if release is not None and release >= EXEC_SECCOMP_RELEASE:
            return
        log.warning(
            "%s: %s (release %s) applies the container's seccomp profile to its own processes "
            "only: its execs run without it (runsc confines execs from release-20260330.0 on)",
            self._id, binary, release or "unknown",
        )  # fmt: skip

    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        if self._check_exec_seccomp:
            self._check_exec_seccomp = False  # once per container: probes exec every few seconds
            await self._warn_of_unconfined_execs()
        adapted = copy.deepcopy(dict(process))
        binary = self.options.binary_name
        await runsc_spec.adapt_capabilities(adapted, binary, f"{self._id} exec {exec_id}")
        launched = await super().exec(exec_id, adapted, stdio)
        sandbox_pid_file = self._pid_file(f"{exec_id}-sandbox")
        self._execs[exec_id] = _Exec(launched.pid, oci.read_pid(sandbox_pid_file))
        os.unlink(sandbox_pid_file)
        launched.exited.add_done_callback(lambda _: self._execs.pop(exec_id, None))
        return launched

    async def kill(self, signal: int, all_processes: bool) -> None:
        if not self._started:
            self._end_unstarted(signal)
            return
        await self._resume_to_signal(signal)
        await super().kill(signal, all_processes)

    def _end_unstarted(self, signum: int) -> None:
        """runsc signals only a running container ("cannot signal container in state
        created"), yet a container whose start failed, or that the kubelet removes before
        starting it, must be killable, as a runc container's waiting init is: its init never
        ran, so it ends without running a handler. An own sandbox is killed on the host; a
        sub-container, which has no process yet, just exits."""
        if self._exit is not None:
            self._exit.kill_unstarted(signum)
            return
        if self._sandbox_exited is None or self._sandbox_exited.done():
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found")
        # Our child, not reaped while its exit is pending: the pid is still the sandbox's.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)

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
        if self._sandbox_id is not None:
            raise NotImplementedError(whole_sandbox_only("checkpoint", self._sandbox_id))
        oci.refuse_incremental_checkpoint(request, "runsc checkpoints whole sandboxes only")
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
    def __init__(self, context: ShimContext) -> None:
        super().__init__(context)
        self.commands = RunscCommands()  # the shim's: one pod's containers

    def container(self, config: ContainerConfig) -> Container:
        return RunscContainer(self, config)

    @classmethod
    def cleanup(cls, namespace: str, bundle: str, container_id: str) -> int:
        return oci.cleanup(RunscOptions.load(bundle), namespace, bundle, container_id)
