"""containerd's Task service over any backend.

The service owns what containerd sees: the per-process state machines, stdio, rootfs mounts and
the order of events. Backends (shim.runtimes) only run processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp

from shim.api.events import task_pb2 as events
from shim.api.runc import options_pb2 as runc_options
from shim.api.task.v2 import shim_pb2 as api
from shim.api.types import task_pb2 as types
from shim.io.stdio import ProcessIO
from shim.runtimes.base import (
    CheckpointRequest,
    Container,
    ContainerConfig,
    Launched,
    ProcessStdio,
    Runtime,
)
from shim.sys.mount import MountSpec, mount_rootfs, unmount_all
from shim.sys.oom import OomWatcher
from shim.sys.reaper import Exit, Reaper
from shim.task.container import ContainerRecord, check_new_container
from shim.task.events import Publisher
from shim.task.process import NOT_EXITED_SECONDS, STATUS_CODES, Process, Status, StdioRequest
from shim.task.requests import json_object
from shim.ttrpc.errors import Code, TtrpcError
from shim.ttrpc.server import CallContext

log = logging.getLogger(__name__)

OUTPUT_DRAIN_TIMEOUT = 2.0  # how long an exit waits for the last output to be copied
EXIT_PUBLISH_TIMEOUT = 2.0  # how long Delete waits for the exit event to reach containerd
EXEC_EXIT_GRACE = 10.0  # how long an init's exit waits for its execs' exits to go first
KILL_REPLY_GRACE = 5.0  # how long an exit waits for the Kill that caused it to be answered
PROCESS_DETAILS_URL = "containerd.runc.v1.ProcessDetails"
VALID_SIGNALS = {0} | {int(s) for s in signal.valid_signals()}  # 0: does it exist?


def _timestamp(ns: int | None) -> Timestamp:
    stamp = Timestamp()
    if ns is None:
        stamp.seconds = NOT_EXITED_SECONDS
    else:
        stamp.FromNanoseconds(ns)
    return stamp


class TaskContainer(ContainerRecord[Process]):
    def __init__(self, id: str, bundle: str, backend: Container, init: Process, rootfs: str):
        super().__init__(id, bundle, backend, init)
        self.rootfs = rootfs  # mounted by us, or "" when the client brought its own rootfs
        self.exit_published: asyncio.Future[bool] | None = None
        self.kills: set[asyncio.Task[None]] = set()  # Kill calls still signalling


class TaskService:
    def __init__(
        self,
        runtime: Runtime,
        publisher: Publisher,
        request_shutdown: Callable[[], None],
    ) -> None:
        self._runtime = runtime
        self._publisher = publisher
        self._request_shutdown = request_shutdown
        self._containers: dict[str, TaskContainer] = {}
        self._creating: set[str] = set()
        self._shutdown_asked = False  # a Shutdown came while containers remained
        self._watchers: set[asyncio.Task[None]] = set()
        self._oom = OomWatcher(asyncio.get_running_loop(), self._on_oom)

    # -- helpers ---------------------------------------------------------------------------

    def _container(self, id: str) -> TaskContainer:
        try:
            return self._containers[id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, "container not created") from None

    @property
    def reaper(self) -> Reaper:
        return self._runtime.context.reaper

    async def _open_io(self, process: Process) -> ProcessIO:
        stdio = process.stdio
        return await ProcessIO.create(
            reaper=self.reaper,
            process_id=process.id,
            namespace=self._runtime.context.namespace,
            stdin=stdio.stdin,
            stdout=stdio.stdout,
            stderr=stdio.stderr,
            terminal=stdio.terminal,
        )

    @staticmethod
    def _runtime_stdio(io: ProcessIO, terminal: bool) -> ProcessStdio:
        stdin, stdout, stderr = io.runtime_stdio
        return ProcessStdio(stdin, stdout, stderr, terminal)

    def _track(self, container: TaskContainer, process: Process, launched: Launched) -> None:
        """The process runs: wire its pty and start watching for its exit."""
        assert process.io is not None
        process.io.close_runtime_ends()
        if launched.console_master is not None:
            process.io.attach_console(launched.console_master)
        process.launched(launched.pid)
        watcher = asyncio.get_running_loop().create_task(
            self._on_exit(container, process, launched)
        )
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _on_exit(
        self, container: TaskContainer, process: Process, launched: Launched
    ) -> None:
        exit = await launched.exited
        async with process.lock:  # the start event of this process is queued first
            if container.kills:
                # A Kill is answered before the exit it caused is known: containerd 1.6's CRI
                # deletes a task on its exit and closes that task's connection, failing a Kill
                # still in flight there ("ttrpc: closed": StopPodSandbox fails).
                await asyncio.wait(container.kills, timeout=KILL_REPLY_GRACE)
            if process.is_init:
                await container.init_exited(self._oom)
                await self._wait_execs(container)
            if process.io is not None:
                # Whoever learns of the exit (Wait, the event) may stop reading at once: the
                # last output must already be in the client's FIFO by then.
                await process.io.wait_output(OUTPUT_DRAIN_TIMEOUT)
            process.set_exited(exit)
            if process.status is Status.DELETED:
                return
            published = self._publisher.publish(
                events.TaskExit(
                    container_id=container.id,
                    id=process.id,
                    pid=exit.pid,
                    exit_status=exit.status,
                    exited_at=_timestamp(exit.exited_at_ns),
                )
            )
            if process.is_init:
                container.exit_published = published

    @staticmethod
    async def _wait_execs(container: TaskContainer) -> None:
        # An exec whose start is in flight (runc exec ran, its pid not yet read) may have died
        # with the init: let the start finish so that its exit is waited for below.
        for starting in [p for p in container.execs.values() if p.lock.locked()]:
            async with starting.lock:
                pass
        running = [p.exited.wait() for p in container.execs.values() if p.pid and not p.exit]
        if running:  # an exec's exit is published before its init's exit
            done, _ = await asyncio.wait(
                [asyncio.ensure_future(w) for w in running], timeout=EXEC_EXIT_GRACE
            )
            if len(done) < len(running):
                log.warning("%s: execs still running after the init exited", container.id)

    def _on_oom(self, container_id: str) -> None:
        self._publisher.publish(events.TaskOOM(container_id=container_id))

    def _state_response(self, container: TaskContainer, process: Process) -> api.StateResponse:
        status = process.status
        if not process.is_init and container.init.status in (Status.PAUSED, Status.PAUSING):
            status = container.init.status
        return api.StateResponse(
            id=process.id,
            bundle=container.bundle,
            pid=process.pid,
            status=STATUS_CODES[status],  # type: ignore[arg-type]
            stdin=process.stdio.stdin,
            stdout=process.stdio.stdout,
            stderr=process.stdio.stderr,
            terminal=process.stdio.terminal,
            exit_status=process.exit_status,
            exited_at=_timestamp(process.exited_at_ns),
        )

    # -- RPCs ------------------------------------------------------------------------------

    async def Create(self, request: api.CreateTaskRequest, ctx: CallContext) -> Any:
        check_new_container(request.id, self._containers, self._creating)
        self._creating.add(request.id)
        self._shutdown_asked = False  # the shim has work again: only a later Shutdown counts
        try:
            container = await self._create(request)
        finally:
            self._creating.discard(request.id)
        self._containers[request.id] = container
        self._publisher.publish(
            events.TaskCreate(
                container_id=request.id,
                bundle=request.bundle,
                rootfs=request.rootfs,
                io=events.TaskIO(
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    terminal=request.terminal,
                ),
                checkpoint=request.checkpoint,
                pid=container.init.pid,
            )
        )
        return api.CreateTaskResponse(pid=container.init.pid)

    async def _create(self, request: api.CreateTaskRequest) -> TaskContainer:
        bundle = request.bundle
        if not os.path.isfile(os.path.join(bundle, "config.json")):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"bundle {bundle!r} has no config.json")
        init = Process(
            request.id,
            "",
            StdioRequest(request.stdin, request.stdout, request.stderr, request.terminal),
        )
        rootfs = ""
        try:
            if request.rootfs:
                rootfs = os.path.join(bundle, "rootfs")
                os.makedirs(rootfs, mode=0o711, exist_ok=True)
                specs = [
                    MountSpec(m.type, m.source, m.target, tuple(m.options)) for m in request.rootfs
                ]
                try:
                    mount_rootfs(specs, rootfs)
                except OSError as exc:
                    rootfs = ""
                    raise TtrpcError(Code.UNKNOWN, f"failed to mount rootfs: {exc}") from exc
            init.io = await self._open_io(init)
            config = ContainerConfig(
                id=request.id,
                bundle=bundle,
                stdio=self._runtime_stdio(init.io, request.terminal),
                options=request.options if request.HasField("options") else None,
                checkpoint=request.checkpoint,
            )
            backend = self._runtime.container(config)
            container = TaskContainer(request.id, bundle, backend, init, rootfs)
            try:
                launched = await backend.create()
            except BaseException:
                # Cancelled or failed half-way: the runtime may hold a container already.
                with contextlib.suppress(Exception):
                    await backend.delete(force=True)
                raise
        except BaseException:
            if init.io is not None:
                await init.io.close()
            if rootfs:
                unmount_all(rootfs)
            raise
        if launched is not None:
            self._track(container, init, launched)
            init.status = Status.CREATED  # launched, but user code waits for Start
        return container

    async def Start(self, request: api.StartRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        if process.is_init:
            await self._start_init(container)
        else:
            await self._start_exec(container, process)
        return api.StartResponse(pid=process.pid)

    async def _start_init(self, container: TaskContainer) -> None:
        init = container.init
        async with init.lock:
            init.require("start", Status.CREATED)
            try:
                launched = await container.backend.start()
            except BaseException:
                if init.pid == 0:  # a deferred launch (restore) failed: Wait must not hang
                    init.set_exited(_failed_exit())
                raise
            if launched is not None:  # restored from a checkpoint: the process is new
                self._track(container, init, launched)
            init.status = Status.RUNNING
            self._watch_oom(container)
            self._publisher.publish(events.TaskStart(container_id=container.id, pid=init.pid))

    def _watch_oom(self, container: TaskContainer) -> None:
        if not container.backend.reports_oom(lambda: self._on_oom(container.id)):
            container.watch_cgroup_oom(self._oom)

    async def _start_exec(self, container: TaskContainer, process: Process) -> None:
        async with process.lock:
            process.require("start", Status.CREATED)
            if container.init.status is not Status.RUNNING:
                raise TtrpcError(
                    Code.FAILED_PRECONDITION,
                    f"container {container.id} init process is not running",
                )
            try:
                # A failed start, stdio included, ends the process so that its Wait returns.
                process.io = await self._open_io(process)
                launched = await container.backend.exec(
                    process.exec_id,
                    process.spec,
                    self._runtime_stdio(process.io, process.stdio.terminal),
                )
            except BaseException:
                if process.io is not None:
                    await process.io.close()
                    process.io = None
                process.set_exited(_failed_exit())
                raise
            self._track(container, process, launched)
            self._publisher.publish(
                events.TaskExecStarted(
                    container_id=container.id, exec_id=process.exec_id, pid=process.pid
                )
            )

    async def Exec(self, request: api.ExecProcessRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        container.check_new_exec(request.exec_id)
        spec = json_object(request.spec.value, "exec process spec")
        spec["terminal"] = request.terminal
        process = Process(
            container.id,
            request.exec_id,
            StdioRequest(request.stdin, request.stdout, request.stderr, request.terminal),
        )
        process.spec = spec
        container.execs[request.exec_id] = process
        self._publisher.publish(
            events.TaskExecAdded(container_id=container.id, exec_id=request.exec_id)
        )
        return Empty()

    async def State(self, request: api.StateRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        return self._state_response(container, container.process(request.exec_id))

    async def Wait(self, request: api.WaitRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        await process.exited.wait()
        return api.WaitResponse(
            exit_status=process.exit_status, exited_at=_timestamp(process.exited_at_ns)
        )

    async def Kill(self, request: api.KillRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        if process.status is Status.DELETED:
            raise TtrpcError(Code.NOT_FOUND, "process already finished")
        if request.signal not in VALID_SIGNALS:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid signal {request.signal}")
        signalling = asyncio.ensure_future(self._signal(container, process, request))
        container.kills.add(signalling)
        signalling.add_done_callback(container.kills.discard)
        await signalling
        return Empty()

    @staticmethod
    async def _signal(container: TaskContainer, process: Process, request: api.KillRequest) -> None:
        if process.is_init:
            await container.backend.kill(request.signal, request.all)
        elif process.pid == 0 or process.exit is not None:
            process.signal(request.signal)  # refuses, saying why
        elif not await container.backend.kill_exec(process.exec_id, request.signal):
            process.signal(request.signal)

    async def Delete(self, request: api.DeleteRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        process.require("delete", Status.CREATED, Status.STOPPED)
        if process.is_init:
            await self._delete_container(container)
        else:
            await container.backend.delete_exec(process.exec_id)
            del container.execs[process.exec_id]
        if process.io is not None:
            await process.io.close()
        process.forget()
        response = api.DeleteResponse(
            pid=process.pid,
            exit_status=process.exit_status,
            exited_at=_timestamp(process.exited_at_ns),
        )
        if process.is_init:
            self._publisher.publish(
                events.TaskDelete(
                    container_id=container.id,
                    pid=process.pid,
                    exit_status=process.exit_status,
                    exited_at=response.exited_at,
                )
            )
        return response

    async def _delete_container(self, container: TaskContainer) -> None:
        if container.exit_published is not None:  # the exit reaches containerd before the delete
            await asyncio.wait([container.exit_published], timeout=EXIT_PUBLISH_TIMEOUT)
        container.init.status = Status.DELETED  # a late exit of a never-started init is not news
        await container.backend.delete()
        for process in list(container.execs.values()):  # an exec's own Delete may run meanwhile
            if process.io is not None:
                await process.io.close()
        if container.rootfs:
            unmount_all(container.rootfs)
        self._oom.remove(container.id)
        del self._containers[container.id]
        if self._shutdown_asked and not self.has_containers():
            asyncio.get_running_loop().call_soon(self._request_shutdown)

    async def Pids(self, request: api.PidsRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        if container.init.exit is not None:
            # The runtime has no processes left to list, but containerd 1.7/2.x call Pids when
            # they reload after a restart and tear down a shim that lists none as leaked,
            # reporting 137 instead of the exit status this shim still holds.
            return api.PidsResponse(processes=[types.ProcessInfo(pid=container.init.pid)])
        exec_ids = container.exec_ids_by_pid()
        processes = []
        for pid in await container.backend.pids():
            info = types.ProcessInfo(pid=pid)
            if pid in exec_ids:
                details = runc_options.ProcessDetails(exec_id=exec_ids[pid])
                info.info.CopyFrom(
                    AnyProto(type_url=PROCESS_DETAILS_URL, value=details.SerializeToString())
                )
            processes.append(info)
        return api.PidsResponse(processes=processes)

    async def Pause(self, request: api.PauseRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        init = container.init
        init.require("pause", Status.RUNNING)
        init.status = Status.PAUSING
        try:
            await container.backend.pause()
        except BaseException:
            init.status = Status.RUNNING
            raise
        init.status = Status.PAUSED
        self._publisher.publish(events.TaskPaused(container_id=container.id))
        return Empty()

    async def Resume(self, request: api.ResumeRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        await container.resume()
        self._publisher.publish(events.TaskResumed(container_id=container.id))
        return Empty()

    async def Checkpoint(self, request: api.CheckpointTaskRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        container.init.require("checkpoint", Status.RUNNING, Status.PAUSED)
        await container.backend.checkpoint(
            CheckpointRequest(
                path=request.path,
                options=request.options if request.HasField("options") else None,
            )
        )
        self._publisher.publish(
            events.TaskCheckpointed(container_id=container.id, checkpoint=request.path)
        )
        return Empty()

    async def Update(self, request: api.UpdateTaskRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        await container.update(json_object(request.resources.value, "resources"))
        return Empty()

    async def Stats(self, request: api.StatsRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        return api.StatsResponse(stats=await container.backend.stats())

    async def ResizePty(self, request: api.ResizePtyRequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        if not process.is_init and process.status is Status.STOPPED:
            raise TtrpcError(Code.FAILED_PRECONDITION, "cannot resize a stopped process")
        if process.io is not None:
            process.io.resize(request.width, request.height)
            await container.backend.resize(request.exec_id, request.width, request.height)
        return Empty()

    async def CloseIO(self, request: api.CloseIORequest, ctx: CallContext) -> Any:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        if request.stdin and process.io is not None:
            process.io.close_stdin()
        return Empty()

    async def Connect(self, request: api.ConnectRequest, ctx: CallContext) -> Any:
        container = self._containers.get(request.id)
        return api.ConnectResponse(
            shim_pid=os.getpid(), task_pid=container.init.pid if container else 0
        )

    async def Shutdown(self, request: api.ShutdownRequest, ctx: CallContext) -> Any:
        if self.has_containers():
            # Kept for the last Delete: containerd 2.x sends one Shutdown per pod, after the
            # sandbox's Delete, which can overtake its containers' Deletes (a dead gVisor
            # sandbox ends them all at once); no Shutdown follows theirs.
            self._shutdown_asked = True
        else:
            # Reply first: containerd ignores "ttrpc: closed", but a clean reply is cheaper.
            asyncio.get_running_loop().call_soon(self._request_shutdown)
        return Empty()

    def has_containers(self) -> bool:
        return bool(self._containers or self._creating)

    async def close(self) -> None:
        self._oom.close()
        for watcher in list(self._watchers):
            watcher.cancel()


def _failed_exit() -> Exit:
    """What Wait reports for an exec whose start failed: it never ran."""
    return Exit(pid=0, status=255, exited_at_ns=time.time_ns())
