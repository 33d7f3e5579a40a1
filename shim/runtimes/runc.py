"""The runc backend: drives the runc CLI (or any binary that speaks it)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shim.io.console import ConsoleSocket
from shim.runtimes.base import (
    CheckpointRequest,
    Container,
    ContainerConfig,
    Launched,
    ProcessStdio,
    Runtime,
)
from shim.sys.mount import unmount_all
from shim.sys.spawn import CommandResult, run_command
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

OPTIONS_URL = "containerd.runc.v1.Options"
CHECKPOINT_OPTIONS_URL = "containerd.runc.v1.CheckpointOptions"
DEFAULT_ROOT = "/run/containerd/runc"
OPTIONS_FILE = "options.json"
CONSOLE_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 4.0  # containerd kills `delete` after 5 s


@dataclass(frozen=True)
class RuncOptions:
    """The parts of containerd.runc.v1.Options this backend uses; saved in the bundle so that
    the ``delete`` command finds the same binary and root after the shim is gone."""

    binary_name: str = "runc"
    root: str = DEFAULT_ROOT
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    criu_work_path: str = ""

    @classmethod
    def from_any(cls, options: Any | None) -> RuncOptions:
        if options is None or options.type_url != OPTIONS_URL:
            if options is not None and options.type_url:
                log.info("ignoring runtime options of type %s", options.type_url)
            return cls()
        from shim.api.runc.options_pb2 import Options

        decoded = Options.FromString(options.value)
        return cls(
            binary_name=decoded.binary_name or "runc",
            root=decoded.root or DEFAULT_ROOT,
            systemd_cgroup=decoded.systemd_cgroup,
            no_pivot_root=decoded.no_pivot_root,
            no_new_keyring=decoded.no_new_keyring,
            criu_work_path=decoded.criu_work_path,
        )

    def save(self, bundle: str) -> None:
        path = os.path.join(bundle, OPTIONS_FILE)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(self.__dict__, f)

    @classmethod
    def load(cls, bundle: str) -> RuncOptions:
        try:
            with open(os.path.join(bundle, OPTIONS_FILE)) as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError):
            return cls()

    def global_args(self, namespace: str, bundle: str) -> list[str]:
        args = [
            self.binary_name,
            "--root",
            os.path.join(self.root, namespace),
            "--log",
            os.path.join(bundle, "log.json"),
            "--log-format",
            "json",
        ]
        if self.systemd_cgroup:
            args.append("--systemd-cgroup")
        return args


def last_runc_error(bundle: str, result: CommandResult | None = None) -> str:
    """runc's own explanation: the last error in its JSON log, else its stderr."""
    message = ""
    with contextlib.suppress(OSError), open(os.path.join(bundle, "log.json"), "rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("level") == "error" and entry.get("msg"):
                    message = str(entry["msg"])
    if not message and result is not None:
        message = (result.stderr or result.stdout).decode(errors="replace").strip()
    return message or "unknown error"


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


@contextlib.contextmanager
def _stdio_fds(stdio: ProcessStdio) -> Iterator[dict[int, int]]:
    """runc's stdio: the container's pipes, or /dev/null. Never a pipe of ours: the container
    would inherit it and we would wait for its EOF forever."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield {
            0: null if stdio.stdin is None else stdio.stdin,
            1: null if stdio.stdout is None else stdio.stdout,
            2: null if stdio.stderr is None else stdio.stderr,
        }
    finally:
        os.close(null)


class RuncContainer(Container):
    def __init__(self, runtime: RuncRuntime, config: ContainerConfig) -> None:
        self._context = runtime.context
        self._config = config
        self.options = RuncOptions.from_any(config.options)
        self.options.save(config.bundle)
        self._pid = 0

    @property
    def _id(self) -> str:
        return self._config.id

    @property
    def _bundle(self) -> str:
        return self._config.bundle

    async def _runc(
        self, *args: str, input: bytes | None = None, fds: Mapping[int, int] | None = None
    ) -> CommandResult:
        argv = [*self.options.global_args(self._context.namespace, self._bundle), *args]
        try:
            return await run_command(self._context.reaper, argv, input=input, fds=fds)
        except FileNotFoundError as exc:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"runtime binary {self.options.binary_name!r} not found"
            ) from exc

    async def _checked(self, operation: str, *args: str, input: bytes | None = None) -> bytes:
        result = await self._runc(*args, input=input)
        if result.status != 0:
            raise TtrpcError(
                Code.UNKNOWN,
                f"OCI runtime {operation} failed: {last_runc_error(self._bundle, result)}",
            )
        return result.stdout

    async def _launch(self, args: Sequence[str], stdio: ProcessStdio, pid_file: str) -> Launched:
        """Run a runc command that leaves a process behind (create, exec, restore)."""
        console = ConsoleSocket.create() if stdio.terminal else None
        argv = list(args)
        if console is not None:
            argv[1:1] = ["--console-socket", console.path]
        reaper = self._context.reaper
        try:
            with reaper.collect(), _stdio_fds(stdio) as fds:
                result = await self._runc(*argv, fds=fds)
                if result.status != 0:
                    raise TtrpcError(
                        Code.UNKNOWN,
                        f"OCI runtime {args[0]} failed: {last_runc_error(self._bundle, result)}",
                    )
                pid = _read_pid(pid_file)
                exited = reaper.watch(pid)
            master = await console.receive_master(CONSOLE_TIMEOUT) if console else None
        finally:
            if console is not None:
                console.close()
        return Launched(pid=pid, exited=exited, console_master=master)

    async def create(self) -> Launched | None:
        if self._config.checkpoint:
            return None  # restored at Start
        args = ["create", "--bundle", self._bundle, "--pid-file", self._pid_file("init")]
        args += self._create_flags()
        launched = await self._launch([*args, self._id], self._config.stdio, self._pid_file("init"))
        self._pid = launched.pid
        return launched

    def _create_flags(self) -> list[str]:
        flags = []
        if self.options.no_pivot_root:
            flags.append("--no-pivot")
        if self.options.no_new_keyring:
            flags.append("--no-new-keyring")
        return flags

    def _pid_file(self, name: str) -> str:
        return os.path.join(self._bundle, f"{name}.pid")

    async def start(self) -> Launched | None:
        if not self._config.checkpoint:
            await self._checked("start", "start", self._id)
            return None
        work = self.options.criu_work_path or os.path.join(self._bundle, "work")
        args = ["restore", "--image-path", self._config.checkpoint, "--work-path", work]
        if self._config.parent_checkpoint:
            args += ["--parent-path", self._config.parent_checkpoint]
        args += ["--detach", "--pid-file", self._pid_file("init"), *self._create_flags()]
        args += ["--no-subreaper", "--bundle", self._bundle, self._id]
        launched = await self._launch(args, self._config.stdio, self._pid_file("init"))
        self._pid = launched.pid
        return launched

    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        spec_path = os.path.join(self._bundle, f".{exec_id}.process.json")
        with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(process, f)
        pid_file = self._pid_file(exec_id)
        try:
            args = ["exec", "--process", spec_path, "--detach", "--pid-file", pid_file, self._id]
            return await self._launch(args, stdio, pid_file)
        finally:
            os.unlink(spec_path)

    async def kill(self, signal: int, all_processes: bool) -> None:
        args = ["kill", *(["--all"] if all_processes else []), self._id, str(signal)]
        result = await self._runc(*args)
        if result.status == 0:
            return
        message = last_runc_error(self._bundle, result)
        lowered = message.lower()
        if any(
            text in lowered
            for text in ("not running", "no such process", "already finished", "esrch")
        ):
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found")
        if "does not exist" in lowered:
            raise TtrpcError(Code.NOT_FOUND, "no such container: not found")
        raise TtrpcError(Code.UNKNOWN, f"OCI runtime kill failed: {message}")

    async def delete(self, force: bool = False) -> None:
        result = await self._runc("delete", *(["--force"] if force else []), self._id)
        if result.status != 0:
            message = last_runc_error(self._bundle, result)
            if "does not exist" not in message:
                raise TtrpcError(Code.UNKNOWN, f"OCI runtime delete failed: {message}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._pid_file("init"))

    async def pause(self) -> None:
        await self._checked("pause", "pause", self._id)

    async def resume(self) -> None:
        await self._checked("resume", "resume", self._id)

    async def pids(self) -> Sequence[int]:
        output = await self._checked("ps", "ps", "--format", "json", self._id)
        try:
            return [int(pid) for pid in json.loads(output or b"[]")]
        except (ValueError, TypeError) as exc:
            raise TtrpcError(Code.UNKNOWN, f"runc ps printed no pid list: {exc}") from exc

    async def update(self, resources: Mapping[str, Any]) -> None:
        await self._checked(
            "update", "update", "--resources", "-", self._id, input=json.dumps(resources).encode()
        )

    async def stats(self) -> Any:
        from shim.sys.cgroups import Cgroup

        try:
            return Cgroup.for_pid(self._pid).stats()
        except OSError as exc:
            raise TtrpcError(Code.NOT_FOUND, f"cgroup does not exist: {exc}") from exc

    async def checkpoint(self, request: CheckpointRequest) -> None:
        from shim.api.runc.options_pb2 import CheckpointOptions

        options = CheckpointOptions()
        if request.options is not None and request.options.type_url == CHECKPOINT_OPTIONS_URL:
            options = CheckpointOptions.FromString(request.options.value)
        work = options.work_path or os.path.join(self._bundle, "work", "criu-work")
        args = ["checkpoint", "--image-path", options.image_path or request.path]
        args += ["--work-path", work]
        flag_options = (
            (options.open_tcp, "--tcp-established"),
            (options.external_unix_sockets, "--ext-unix-sk"),
            (options.terminal, "--shell-job"),
            (options.file_locks, "--file-locks"),
            (not options.exit, "--leave-running"),
        )
        args += [flag for enabled, flag in flag_options if enabled]
        for namespace in options.empty_namespaces:
            args += ["--empty-ns", namespace]
        await self._checked("checkpoint", *args, self._id)

    async def on_init_exit(self) -> None:
        if not self._has_own_pid_namespace():
            # Nobody else would kill what the container left behind in the host's pid namespace.
            await self._runc("kill", "--all", self._id, "9")

    def _has_own_pid_namespace(self) -> bool:
        try:
            with open(os.path.join(self._bundle, "config.json")) as f:
                namespaces = json.load(f).get("linux", {}).get("namespaces", [])
        except (OSError, ValueError):
            return False
        return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


class RuncRuntime(Runtime):
    def container(self, config: ContainerConfig) -> Container:
        return RuncContainer(self, config)

    @classmethod
    def cleanup(cls, namespace: str, bundle: str, container_id: str) -> int:
        options = RuncOptions.load(bundle)
        argv = [*options.global_args(namespace, bundle), "delete", "--force", container_id]
        try:
            subprocess.run(argv, capture_output=True, timeout=CLEANUP_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("runc delete --force %s: %s", container_id, exc)
        unmount_all(os.path.join(bundle, "rootfs"))
        try:
            return _read_pid(os.path.join(bundle, "init.pid"))
        except (OSError, ValueError):
            return 0
