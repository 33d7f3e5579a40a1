"""What backends that drive an OCI runtime CLI share (runc, runsc, ...): global flags, pid
files, console sockets, the runtime's error messages, and the commands whose command line is
the same for every such runtime."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from shim.io.console import ConsoleSocket
from shim.runtimes.base import (
    CheckpointRequest,
    Container,
    ContainerConfig,
    Launched,
    ProcessStdio,
    Runtime,
    recorded_init_pid,
)
from shim.sys.mount import unmount_all
from shim.sys.spawn import CommandResult, run_command
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

OPTIONS_FILE = "options.json"
LOG_FILE = "log.json"
CONSOLE_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 4.0  # containerd kills `delete` after 5 s
CHECKPOINT_OPTIONS_URL = "containerd.runc.v1.CheckpointOptions"  # what containerd clients send


@dataclass(frozen=True)
class CliOptions:
    """How to run the runtime binary; saved in the bundle so that the ``delete`` command finds
    the same binary, root and flags after the shim is gone. Subclasses give the defaults."""

    binary_name: str = ""
    root: str = ""

    def global_args(self, namespace: str, bundle: str) -> list[str]:
        log_file = os.path.join(bundle, LOG_FILE)
        args = [self.binary_name, "--root", os.path.join(self.root, namespace)]
        return [*args, "--log", log_file, "--log-format", "json", *self.extra_global_args()]

    def extra_global_args(self) -> list[str]:
        return []

    def may_hold(self, namespace: str, container_id: str) -> bool:
        """Whether the runtime may still keep state for the container (then ``delete`` must
        run it). Unknown layouts: always."""
        return True

    def save(self, bundle: str) -> None:
        path = os.path.join(bundle, OPTIONS_FILE)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(self.__dict__, f)

    @classmethod
    def load(cls, bundle: str) -> Self:
        try:
            with open(os.path.join(bundle, OPTIONS_FILE)) as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError):
            return cls()


def last_runtime_error(bundle: str, result: CommandResult | None = None) -> str:
    """The runtime's own explanation: the last error in its JSON log, else its output. runc
    writes one object per line, runsc writes them back to back."""
    message = text = ""
    with contextlib.suppress(OSError), open(os.path.join(bundle, LOG_FILE)) as f:
        text = f.read()
    decoder = json.JSONDecoder()
    position = 0
    while position < len(text):
        position = _skip_space(text, position)
        try:
            entry, position = decoder.raw_decode(text, position)
        except ValueError:
            position = text.find("\n", position) + 1 or len(text)  # skip a torn line
            continue
        if isinstance(entry, dict) and entry.get("level") == "error" and entry.get("msg"):
            message = str(entry["msg"])
    if not message and result is not None:
        message = (result.stderr or result.stdout).decode(errors="replace").strip()
    return message or "unknown error"


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def checkpoint_options(request: CheckpointRequest) -> Any:
    """containerd.runc.v1.CheckpointOptions from the request (what containerd clients send for
    any OCI runtime), or the defaults."""
    from shim.api.runc.options_pb2 import CheckpointOptions

    return _decode_checkpoint_options(CheckpointOptions, request)


def incremental_checkpoint(request: CheckpointRequest) -> Any:
    """pyshim.checkpoint.v1.IncrementalCheckpoint: fields a client appends to the
    CheckpointOptions' encoding (its proto says why there), or the defaults."""
    from shim.api.checkpoint.v1.checkpoint_pb2 import IncrementalCheckpoint

    return _decode_checkpoint_options(IncrementalCheckpoint, request)


def refuse_incremental_checkpoint(request: CheckpointRequest, reason: str) -> None:
    """For backends that cannot honour pre_dump or parent_path: refused, not a full dump."""
    incremental = incremental_checkpoint(request)
    if incremental.pre_dump or incremental.parent_path:
        raise NotImplementedError(f"incremental checkpoint (pre_dump, parent_path): {reason}")


def _decode_checkpoint_options(message_type: Any, request: CheckpointRequest) -> Any:
    """Options of another type, or that do not decode, are refused (InvalidArgument), as
    containerd's runc shim refuses them, rather than ignored for a checkpoint other than the
    one asked for."""
    from google.protobuf.message import DecodeError

    options = request.options
    if options is None or not options.type_url:
        return message_type()
    if options.type_url != CHECKPOINT_OPTIONS_URL:
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"checkpoint options of type {options.type_url}: expected {CHECKPOINT_OPTIONS_URL}",
        )
    try:
        return message_type.FromString(bytes(options.value))
    except DecodeError as exc:
        raise TtrpcError(
            Code.INVALID_ARGUMENT, f"checkpoint options {CHECKPOINT_OPTIONS_URL}: {exc}"
        ) from exc


def read_spec(bundle: str) -> dict[str, Any]:
    """The bundle's OCI spec, or {} when it cannot be read (the runtime will say why)."""
    with contextlib.suppress(OSError, ValueError), open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
        if isinstance(spec, dict):
            return spec
    return {}


def read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


@contextlib.contextmanager
def stdio_fds(stdio: ProcessStdio) -> Iterator[dict[int, int]]:
    """The runtime's stdio: the container's pipes, or /dev/null. Never a pipe of ours: the
    container would inherit it and we would wait for its EOF forever."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield {
            0: null if stdio.stdin is None else stdio.stdin,
            1: null if stdio.stdout is None else stdio.stdout,
            2: null if stdio.stderr is None else stdio.stderr,
        }
    finally:
        os.close(null)


class OciCliContainer(Container):
    """A container run by an OCI runtime CLI: the commands every such runtime spells alike."""

    def __init__(self, runtime: Runtime, config: ContainerConfig, options: CliOptions) -> None:
        self._context = runtime.context
        self._config = config
        self.options = options
        self.options.save(config.bundle)
        self._pid = 0

    @property
    def _id(self) -> str:
        return self._config.id

    @property
    def _bundle(self) -> str:
        return self._config.bundle

    async def _cli(
        self, *args: str, input: bytes | None = None, fds: Mapping[int, int] | None = None
    ) -> CommandResult:
        argv = [*self.options.global_args(self._context.namespace, self._bundle), *args]
        began = time.monotonic()
        try:
            result = await run_command(self._context.reaper, argv, input=input, fds=fds)
            log.debug("%s %s: %.3f s", argv[0], args[0], time.monotonic() - began)
            return result
        except FileNotFoundError as exc:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"runtime binary {self.options.binary_name!r} not found"
            ) from exc

    async def _checked(self, operation: str, *args: str, input: bytes | None = None) -> bytes:
        result = await self._cli(*args, input=input)
        self._raise_if_failed(operation, result)
        return result.stdout

    def _raise_if_failed(self, operation: str, result: CommandResult) -> None:
        if result.status != 0:
            if result.stderr.startswith(b"unknown command"):  # crun's, not in its log
                raise TtrpcError(
                    Code.UNIMPLEMENTED,
                    f"{self.options.binary_name} has no {operation} command (it said:"
                    f" {result.stderr.decode(errors='replace').strip()})",
                )
            raise TtrpcError(
                Code.UNKNOWN,
                f"OCI runtime {operation} failed: {last_runtime_error(self._bundle, result)}",
            )

    async def _launch(self, args: Sequence[str], stdio: ProcessStdio, pid_file: str) -> Launched:
        """Run a command that leaves a process behind (create, exec, restore)."""
        console = ConsoleSocket.create() if stdio.terminal else None
        argv = list(args)
        if console is not None:
            argv[1:1] = ["--console-socket", console.path]
        reaper = self._context.reaper
        try:
            with reaper.collect(), stdio_fds(stdio) as fds:
                self._raise_if_failed(args[0], await self._cli(*argv, fds=fds))
                pid = read_pid(pid_file)
                exited = reaper.watch(pid)
            master = await console.receive_master(CONSOLE_TIMEOUT) if console else None
        finally:
            if console is not None:
                console.close()
        return Launched(pid=pid, exited=exited, console_master=master)

    def _pid_file(self, name: str) -> str:
        return os.path.join(self._bundle, f"{name}.pid")

    def _create_flags(self) -> list[str]:
        """Flags of create and restore beyond the common ones."""
        return []

    def _restore_flags(self) -> list[str]:
        """Flags of restore only (checkpoint work paths and the like)."""
        return []

    def _exec_flags(self, exec_id: str) -> list[str]:
        return []

    def _create_stdio(self) -> ProcessStdio:
        """The stdio `create` hands over (the container's, unless it takes it at start)."""
        return self._config.stdio

    async def create(self) -> Launched | None:
        if self._config.checkpoint:
            return None  # restored at Start
        args = ["create", "--bundle", self._bundle, "--pid-file", self._pid_file("init")]
        args += [*self._create_flags(), self._id]
        launched = await self._launch(args, self._create_stdio(), self._pid_file("init"))
        self._pid = launched.pid
        return launched

    async def start(self) -> Launched | None:
        if not self._config.checkpoint:
            await self._checked("start", "start", self._id)
            return None
        args = ["restore", "--image-path", self._config.checkpoint, *self._restore_flags()]
        args += ["--detach", "--pid-file", self._pid_file("init"), *self._create_flags()]
        args += ["--bundle", self._bundle, self._id]
        launched = await self._launch(args, self._config.stdio, self._pid_file("init"))
        self._pid = launched.pid
        return launched

    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        spec_path = os.path.join(self._bundle, f".{exec_id}.process.json")
        with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(process, f)
        pid_file = self._pid_file(exec_id)
        try:
            args = ["exec", "--process", spec_path, "--detach", "--pid-file", pid_file]
            args += [*self._exec_flags(exec_id), self._id]
            return await self._launch(args, stdio, pid_file)
        finally:
            os.unlink(spec_path)

    async def kill(self, signal: int, all_processes: bool) -> None:
        args = ["kill", *(["--all"] if all_processes else []), self._id, str(signal)]
        await self._signal(args)

    async def _signal(self, args: Sequence[str]) -> None:
        """Run a kill command; a process or container that is gone is NotFound."""
        result = await self._cli(*args)
        if result.status == 0:
            return
        message = last_runtime_error(self._bundle, result)
        lowered = message.lower()
        gone = ("not running", "no such process", "already finished", "esrch", "state stopped")
        if any(text in lowered for text in gone):
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found")
        # runc: "container does not exist"; crun: no state file ("error opening file
        # `<root>/<id>/status`: No such file or directory").
        if "does not exist" in lowered or ("/status`" in lowered and "no such file" in lowered):
            raise TtrpcError(Code.NOT_FOUND, "no such container: not found")
        raise TtrpcError(Code.UNKNOWN, f"OCI runtime kill failed: {message}")

    async def delete(self, force: bool = False) -> None:
        result = await self._cli("delete", *(["--force"] if force else []), self._id)
        if result.status != 0:
            message = last_runtime_error(self._bundle, result)
            if "does not exist" not in message:
                raise TtrpcError(Code.UNKNOWN, f"OCI runtime delete failed: {message}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._pid_file("init"))

    async def pause(self) -> None:
        await self._checked("pause", "pause", self._id)

    async def resume(self) -> None:
        await self._checked("resume", "resume", self._id)

    async def update(self, resources: Mapping[str, Any]) -> None:
        resources_json = json.dumps(resources).encode()
        await self._checked("update", "update", "--resources", "-", self._id, input=resources_json)

    async def pids(self) -> Sequence[int]:
        output = await self._checked("ps", "ps", "--format", "json", self._id)
        try:
            return [int(pid) for pid in json.loads(output or b"[]")]
        except (ValueError, TypeError) as exc:
            raise TtrpcError(Code.UNKNOWN, f"ps printed no pid list: {exc}") from exc


def cleanup(options: CliOptions, namespace: str, bundle: str, container_id: str) -> int:
    """The ``delete`` command of an OCI-CLI backend: force-delete the container in the runtime,
    unmount the rootfs, and return the init pid (0 if unknown)."""
    argv = [*options.global_args(namespace, bundle), "delete", "--force", container_id]
    if options.may_hold(namespace, container_id):  # containerd runs `delete` after every shim
        try:
            subprocess.run(argv, capture_output=True, timeout=CLEANUP_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s delete --force %s: %s", options.binary_name, container_id, exc)
    unmount_all(os.path.join(bundle, "rootfs"))
    return recorded_init_pid(bundle)
