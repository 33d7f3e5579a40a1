"""The Agent service: the guest's containers, run by the runc backend, for the host shim.

The host's Task service keeps what containerd sees (events, exit order, stdio paths); the agent
keeps what lives in the guest: each container's bundle and runc state, its processes with their
exits, and their stdio until the host has read it. Nothing depends on the host's connection:
calls may come again on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from typing import Any

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp

from shim.agent.criu import CriuModules
from shim.agent.oom import OomLog
from shim.agent.process import AgentProcess
from shim.agent.stdio import OutputStream, ProcessStreams
from shim.api.agent.v1 import agent_pb2 as api
from shim.api.runc.options_pb2 import Options as RuncOptionsProto
from shim.runtimes.base import CheckpointRequest, ContainerConfig, Launched
from shim.runtimes.criu import KEPT_DUMP_LOG
from shim.runtimes.runc import OPTIONS_URL, RuncRuntime
from shim.sys.oom import OomWatcher
from shim.task.container import ContainerRecord, check_new_container
from shim.task.process import Status
from shim.task.requests import json_object
from shim.ttrpc.errors import Code, TtrpcError
from shim.ttrpc.server import CallContext

log = logging.getLogger(__name__)

SHUTDOWN_KILL_TIMEOUT = 5.0  # how long close() waits for killed inits to exit


class AgentContainer(ContainerRecord[AgentProcess]):
    def processes(self) -> list[AgentProcess]:
        return [self.init, *self.execs.values()]


class AgentService:
    def __init__(
        self, runtime: RuncRuntime, state_dir: str, runc_options: RuncOptionsProto
    ) -> None:
        self._runtime = runtime
        self._criu = CriuModules(runtime.context.reaper)
        self._state_dir = state_dir
        self._options = AnyProto(type_url=OPTIONS_URL, value=runc_options.SerializeToString())
        self._containers: dict[str, AgentContainer] = {}
        self._busy: set[str] = set()  # ids being created or removed
        self._watchers: set[asyncio.Task[None]] = set()
        self._instance = os.urandom(16).hex()  # uuid would import platform
        self._oom_log = OomLog()
        self._oom = OomWatcher(asyncio.get_running_loop(), self._oom_log.record)

    # -- helpers ---------------------------------------------------------------------------

    def _container(self, container_id: str) -> AgentContainer:
        try:
            return self._containers[container_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"container {container_id} not found") from None

    def _process(self, request: Any) -> AgentProcess:
        return self._container(request.container_id).process(request.exec_id)

    def _track(self, container: AgentContainer, process: AgentProcess, launched: Launched) -> None:
        process.streams.started(launched.console_master)
        process.launched(launched.pid)
        watcher = asyncio.get_running_loop().create_task(
            self._on_exit(container, process, launched)
        )
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _on_exit(
        self, container: AgentContainer, process: AgentProcess, launched: Launched
    ) -> None:
        exit = await launched.exited
        async with process.lock:  # a start in flight sets its state first
            if process.is_init:
                await container.init_exited(self._oom)
            process.oom_sequence = self._oom_log.last
            process.set_exited(exit)

    # -- RPCs ------------------------------------------------------------------------------

    async def Check(self, request: api.CheckRequest, ctx: CallContext) -> Any:
        return api.CheckResponse(instance=self._instance)

    async def SetupGuest(self, request: api.SetupGuestRequest, ctx: CallContext) -> Any:
        from shim.agent.guest import setup_guest

        setup_guest(request)
        return Empty()

    async def CreateContainer(self, request: api.CreateContainerRequest, ctx: CallContext) -> Any:
        container_id = request.container_id
        check_new_container(container_id, self._containers, self._busy)
        self._busy.add(container_id)
        try:
            container = await self._create(request)
        finally:
            self._busy.discard(container_id)
        self._containers[container_id] = container
        return api.ProcessResponse(pid=container.init.pid)

    async def _create(self, request: api.CreateContainerRequest) -> AgentContainer:
        spec = json_object(request.spec, "spec")
        if (spec.get("linux") or {}).get("sysctl"):
            from shim.agent.network import take_root_netns_sysctls

            take_root_netns_sysctls(spec)
        if request.rootfs:
            spec.setdefault("root", {})["path"] = request.rootfs
        bundle = os.path.join(self._state_dir, request.container_id)
        os.makedirs(bundle, mode=0o700)
        os.mkdir(os.path.join(bundle, "work"))  # as in containerd's bundles: CRIU works there
        streams = ProcessStreams(request.container_id, request.stdio)
        try:
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(spec, f)
            config = ContainerConfig(
                id=request.container_id,
                bundle=bundle,
                stdio=streams.runtime_stdio,
                options=self._options,
                checkpoint=request.checkpoint,
            )
            backend = self._runtime.container(config)
            try:
                launched = await backend.create()
            except BaseException:
                with contextlib.suppress(Exception):
                    await backend.delete(force=True)
                raise
        except BaseException:
            streams.close()
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        init = AgentProcess(request.container_id, "", streams)
        container = AgentContainer(request.container_id, bundle, backend, init)
        if launched is not None:  # else a restore, which StartContainer does
            self._track(container, init, launched)
        init.status = Status.CREATED  # launched, but user code waits for the start
        return container

    async def StartContainer(self, request: api.ContainerRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        init = container.init
        async with init.lock:
            init.require("start", Status.CREATED)
            if init.pid:  # else created for a restore: nothing runs yet
                await container.backend.start()
            else:
                self._track(container, init, await self._restore(container))
            init.status = Status.RUNNING
        container.watch_cgroup_oom(self._oom)
        return Empty()

    async def ExecProcess(self, request: api.ExecProcessRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        container.check_new_exec(request.exec_id)
        spec = json_object(request.process, "process")
        spec["terminal"] = request.stdio.terminal
        streams = ProcessStreams(request.exec_id, request.stdio)
        process = AgentProcess(container.id, request.exec_id, streams)
        container.execs[request.exec_id] = process  # reserved while runc runs
        try:
            launched = await container.backend.exec(request.exec_id, spec, streams.runtime_stdio)
        except BaseException:
            del container.execs[request.exec_id]
            streams.close()
            raise
        self._track(container, process, launched)
        return api.ProcessResponse(pid=process.pid)

    async def SignalProcess(self, request: api.SignalProcessRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        process = container.process(request.exec_id)
        if process.is_init:
            await container.backend.kill(request.signal, request.all)
        else:
            process.signal(request.signal)
        return Empty()

    async def WaitProcess(self, request: api.ProcessRequest, ctx: CallContext) -> Any:
        process = self._process(request)
        await process.exited.wait()
        exited_at = Timestamp()
        exited_at.FromNanoseconds(process.exited_at_ns or 0)
        return api.WaitProcessResponse(
            exit_status=process.exit_status,
            exited_at=exited_at,
            oom_sequence=process.oom_sequence,
        )

    async def ReadStdout(self, request: api.ReadStreamRequest, ctx: CallContext) -> Any:
        process = self._process(request)
        return await _read(process, process.streams.stdout, "stdout", request)

    async def ReadStderr(self, request: api.ReadStreamRequest, ctx: CallContext) -> Any:
        process = self._process(request)
        return await _read(process, process.streams.stderr, "stderr", request)

    async def WriteStdin(self, request: api.WriteStdinRequest, ctx: CallContext) -> Any:
        stdin = self._process(request).streams.stdin
        if stdin is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{request.exec_id or 'init'}: no stdin")
        written = await stdin.write(request.offset, request.data)
        return api.WriteStdinResponse(written=written)

    async def CloseStdin(self, request: api.ProcessRequest, ctx: CallContext) -> Any:
        stdin = self._process(request).streams.stdin
        if stdin is not None:
            await stdin.close()
        return Empty()

    async def TtyWinResize(self, request: api.TtyWinResizeRequest, ctx: CallContext) -> Any:
        process = self._process(request)
        process.require("resize", Status.CREATED, Status.RUNNING, Status.PAUSED)
        process.streams.resize(request.rows, request.columns)
        return Empty()

    async def PauseContainer(self, request: api.ContainerRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        container.init.require("pause", Status.RUNNING)
        await container.backend.pause()
        container.init.status = Status.PAUSED
        return Empty()

    async def ResumeContainer(self, request: api.ContainerRequest, ctx: CallContext) -> Any:
        await self._container(request.container_id).resume()
        return Empty()

    async def StatsContainer(self, request: api.ContainerRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        return api.StatsContainerResponse(stats=await container.backend.stats())

    async def UpdateContainer(self, request: api.UpdateContainerRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        await container.update(json_object(request.resources, "resources"))
        return Empty()

    async def ListPids(self, request: api.ContainerRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        exec_ids = container.exec_ids_by_pid()
        return api.ListPidsResponse(
            processes=[
                api.ProcessPid(pid=pid, exec_id=exec_ids.get(pid, ""))
                for pid in await container.backend.pids()
            ]
        )

    async def CheckpointContainer(
        self, request: api.CheckpointContainerRequest, ctx: CallContext
    ) -> Any:
        container = self._container(request.container_id)
        container.init.require("checkpoint", Status.RUNNING, Status.PAUSED)
        if not request.image_path:
            raise TtrpcError(Code.INVALID_ARGUMENT, "no image path to checkpoint into")
        await self._criu.ensure()
        options = request.options if request.HasField("options") else None
        try:
            await container.backend.checkpoint(CheckpointRequest(request.image_path, options))
        except TtrpcError as exc:
            if request.log_path:  # the runc backend kept it in the bundle, out of the host's sight
                with contextlib.suppress(OSError):
                    shutil.copyfile(os.path.join(container.bundle, KEPT_DUMP_LOG), request.log_path)
            raise _without_criu(exc) from None
        return Empty()

    async def _restore(self, container: AgentContainer) -> Launched:
        await self._criu.ensure()
        try:
            launched = await container.backend.start()
        except TtrpcError as exc:
            raise _without_criu(exc) from None
        assert launched is not None  # a restore leaves the container's init behind
        return launched

    async def RemoveProcess(self, request: api.ProcessRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        if not request.exec_id:
            raise TtrpcError(Code.INVALID_ARGUMENT, "the init goes with RemoveContainer")
        process = container.process(request.exec_id)
        process.require("remove", Status.STOPPED)
        del container.execs[request.exec_id]
        process.streams.close()
        process.forget()
        return Empty()

    async def RemoveContainer(self, request: api.ContainerRequest, ctx: CallContext) -> Any:
        container = self._container(request.container_id)
        container.init.require("remove", Status.CREATED, Status.STOPPED)
        if container.id in self._busy:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{container.id} is being removed")
        self._busy.add(container.id)
        try:
            await self._remove(container, force=False)
        finally:
            self._busy.discard(container.id)
        return Empty()

    async def _remove(self, container: AgentContainer, *, force: bool) -> None:
        await container.backend.delete(force=force)
        self._oom.remove(container.id)
        for process in container.processes():
            process.streams.close()
            process.forget()
        shutil.rmtree(container.bundle, ignore_errors=True)
        del self._containers[container.id]

    async def WaitOom(self, request: api.WaitOomRequest, ctx: CallContext) -> Any:
        sequence, container_id = await self._oom_log.wait(request.after)
        return api.WaitOomResponse(sequence=sequence, container_id=container_id)

    async def UpdateInterface(self, request: api.UpdateInterfaceRequest, ctx: CallContext) -> Any:
        from shim.agent.network import update_interface  # a pod with a network only

        update_interface(request.interface)  # a few netlink round trips: not worth a thread
        return Empty()

    async def UpdateRoutes(self, request: api.UpdateRoutesRequest, ctx: CallContext) -> Any:
        from shim.agent.network import update_routes

        update_routes(request.mac, list(request.routes))
        return Empty()

    # -- shutdown --------------------------------------------------------------------------

    async def close(self) -> None:
        """Kills and removes every container, so the agent leaves nothing behind."""
        for container in list(self._containers.values()):
            try:
                if container.init.exit is None:
                    with contextlib.suppress(TtrpcError):
                        await container.backend.kill(9, True)
                    await asyncio.wait_for(container.init.exited.wait(), SHUTDOWN_KILL_TIMEOUT)
                await self._remove(container, force=True)
            except Exception:
                log.exception("removing %s at shutdown", container.id)
        self._oom.close()
        for watcher in list(self._watchers):
            watcher.cancel()


def _without_criu(exc: TtrpcError) -> TtrpcError:
    """A runtime without checkpoint and restore (crun built without CRIU, as Debian's 1.8.1)
    is the setup's problem, and says which runtime has them; any other error as it is."""
    if "unknown command" not in exc.message:
        return exc
    return TtrpcError(
        Code.FAILED_PRECONDITION,
        f"the guest's OCI runtime cannot checkpoint or restore ({exc.message}):"
        ' it needs runc ([vm] guest_runtime = "runc")',
    )


async def _read(
    process: AgentProcess, stream: OutputStream | None, name: str, request: Any
) -> api.ReadStreamResponse:
    if stream is None:
        raise TtrpcError(Code.FAILED_PRECONDITION, f"{process.id} has no {name}")
    return api.ReadStreamResponse(data=await stream.read(request.offset, request.max_bytes))
