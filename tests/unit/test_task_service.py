"""The Task service's state machines and exit routing, over a fake backend that runs real
processes (so the reaper and the exit ordering are the real ones)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

from shim.api.task.v2 import shim_pb2 as api
from shim.runtimes.base import (
    Container,
    ContainerConfig,
    Launched,
    ProcessStdio,
    Runtime,
    ShimContext,
)
from shim.sys.reaper import Reaper
from shim.sys.spawn import spawn
from shim.task.service import TaskService
from shim.ttrpc.errors import Code, TtrpcError
from shim.ttrpc.server import CallContext

CTX = CallContext(service="containerd.task.v2.Task", method="test", metadata={}, deadline=None)
TIMEOUT = 20


class FakeContainer(Container):
    """Create starts `sh` blocked on a pipe (like runc's exec FIFO); Start releases it."""

    def __init__(self, reaper: Reaper, config: ContainerConfig) -> None:
        self._reaper = reaper
        self._config = config
        self._gate: int | None = None
        self._init_pid = 0
        self.exec_pids: list[int] = []
        self.kill_returns_after = 0.0  # like a runtime CLI that exits a while after signalling

    def _args(self) -> list[str]:
        spec = json.loads((Path(self._config.bundle) / "config.json").read_text())
        return list(spec["process"]["args"])

    async def create(self) -> Launched | None:
        gate_read, self._gate = os.pipe()
        script = 'read _ <&3; exec "$@"'
        pid, exited = spawn(
            self._reaper, ["sh", "-c", script, "sh", *self._args()], fds={3: gate_read}
        )
        os.close(gate_read)
        self._init_pid = pid
        return Launched(pid, exited)

    async def start(self) -> Launched | None:
        assert self._gate is not None
        os.write(self._gate, b"go\n")
        os.close(self._gate)
        self._gate = None
        return None

    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        pid, exited = spawn(self._reaper, list(process["args"]))
        self.exec_pids.append(pid)
        return Launched(pid, exited)

    async def kill(self, signal: int, all_processes: bool) -> None:
        os.kill(self._init_pid, signal)
        await asyncio.sleep(self.kill_returns_after)

    async def delete(self, force: bool = False) -> None:
        if self._gate is not None:
            os.close(self._gate)
            self._gate = None

    async def on_init_exit(self) -> None:
        # A pid namespace's init takes its execs with it.
        for pid in self.exec_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def pids(self) -> Sequence[int]:
        return self.exec_pids


class FakeRuntime(Runtime):
    def __init__(self, context: ShimContext) -> None:
        super().__init__(context)
        self.containers: dict[str, FakeContainer] = {}

    def container(self, config: ContainerConfig) -> Container:
        self.containers[config.id] = FakeContainer(self.context.reaper, config)
        return self.containers[config.id]

    @classmethod
    def cleanup(cls, namespace: str, bundle: str, container_id: str) -> int:
        return 0


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[Message] = []

    def publish(self, event: Message) -> asyncio.Future[bool]:
        self.events.append(event)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(True)
        return done

    def names(self) -> list[str]:
        return [type(event).__name__ for event in self.events]


Scenario = Callable[[TaskService, RecordingPublisher, FakeRuntime, Path], Awaitable[None]]


def run_scenario(tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        reaper = Reaper.install(loop)
        try:
            runtime = FakeRuntime(ShimContext("test", "io.containerd.fake.v1", reaper))
            publisher = RecordingPublisher()
            service = TaskService(runtime, publisher, lambda: None)
            try:
                await asyncio.wait_for(scenario(service, publisher, runtime, tmp_path), TIMEOUT)
            finally:
                await service.close()
        finally:
            reaper.close()

    asyncio.run(main())


def bundle(tmp_path: Path, name: str, *args: str) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"process": {"args": list(args)}}))
    return str(path)


def exec_spec(*args: str) -> AnyProto:
    value = json.dumps({"args": list(args), "cwd": "/"}).encode()
    return AnyProto(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=value
    )


async def create(service: TaskService, tmp_path: Path, name: str, *args: str) -> int:
    response = await service.Create(
        api.CreateTaskRequest(id=name, bundle=bundle(tmp_path, name, *args)), CTX
    )
    return int(response.pid)


async def expect_error(code: Code, call: Awaitable[Any]) -> TtrpcError:
    with pytest.raises(TtrpcError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


def test_lifecycle_publishes_events_in_order(tmp_path: Path) -> None:
    async def scenario(service: TaskService, events: RecordingPublisher, *_: Any) -> None:
        pid = await create(service, tmp_path, "c1", "sh", "-c", "exit 3")
        assert pid > 0
        state = await service.State(api.StateRequest(id="c1"), CTX)
        assert (state.status, state.pid) == (1, pid)  # CREATED
        waiting = asyncio.ensure_future(service.Wait(api.WaitRequest(id="c1"), CTX))
        started = await service.Start(api.StartRequest(id="c1"), CTX)
        assert started.pid == pid
        waited = await waiting
        assert waited.exit_status == 3
        state = await service.State(api.StateRequest(id="c1"), CTX)
        assert (state.status, state.exit_status) == (3, 3)  # STOPPED
        # Still listed: containerd 1.7/2.x tear down a shim whose Pids is empty at reload.
        pids = await service.Pids(api.PidsRequest(id="c1"), CTX)
        assert [p.pid for p in pids.processes] == [pid]
        deleted = await service.Delete(api.DeleteRequest(id="c1"), CTX)
        assert (deleted.pid, deleted.exit_status) == (pid, 3)
        assert events.names() == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"]
        await expect_error(Code.NOT_FOUND, service.State(api.StateRequest(id="c1"), CTX))

    run_scenario(tmp_path, scenario)


def test_start_event_precedes_exit_of_a_process_that_exits_at_once(tmp_path: Path) -> None:
    async def scenario(service: TaskService, events: RecordingPublisher, *_: Any) -> None:
        for n in range(10):
            name = f"quick{n}"
            await create(service, tmp_path, name, "true")
            await service.Start(api.StartRequest(id=name), CTX)
            await service.Wait(api.WaitRequest(id=name), CTX)
            await service.Delete(api.DeleteRequest(id=name), CTX)
        names = events.names()
        for n in range(10):
            mine = names[n * 4 : n * 4 + 4]
            assert mine == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"], names

    run_scenario(tmp_path, scenario)


def test_a_kill_is_answered_before_the_exit_it_caused_is_known(tmp_path: Path) -> None:
    """containerd 1.6's CRI deletes a task when its exit arrives and closes that task's
    connection: a Kill still unanswered then fails with "ttrpc: closed"."""

    async def scenario(
        service: TaskService, events: RecordingPublisher, runtime: FakeRuntime, _: Path
    ) -> None:
        await create(service, tmp_path, "c1", "sleep", "100")
        await service.Start(api.StartRequest(id="c1"), CTX)
        runtime.containers["c1"].kill_returns_after = 0.3
        waiting = asyncio.ensure_future(service.Wait(api.WaitRequest(id="c1"), CTX))
        await service.Kill(api.KillRequest(id="c1", signal=signal.SIGKILL), CTX)
        assert "TaskExit" not in events.names(), "the exit went out before the Kill's answer"
        assert not waiting.done()
        assert (await waiting).exit_status == 137
        assert events.names()[-1] == "TaskExit"

    run_scenario(tmp_path, scenario)


def test_illegal_transitions_are_failed_preconditions(tmp_path: Path) -> None:
    async def scenario(service: TaskService, *_: Any) -> None:
        await create(service, tmp_path, "c", "sleep", "30")
        await expect_error(Code.FAILED_PRECONDITION, service.Resume(api.ResumeRequest(id="c"), CTX))
        await service.Start(api.StartRequest(id="c"), CTX)
        await expect_error(Code.FAILED_PRECONDITION, service.Start(api.StartRequest(id="c"), CTX))
        await expect_error(Code.FAILED_PRECONDITION, service.Delete(api.DeleteRequest(id="c"), CTX))
        await expect_error(Code.FAILED_PRECONDITION, service.Resume(api.ResumeRequest(id="c"), CTX))
        state = await service.State(api.StateRequest(id="c"), CTX)
        os.kill(state.pid, signal.SIGKILL)
        waited = await service.Wait(api.WaitRequest(id="c"), CTX)
        assert waited.exit_status == 137
        await expect_error(Code.FAILED_PRECONDITION, service.Start(api.StartRequest(id="c"), CTX))
        await expect_error(
            Code.FAILED_PRECONDITION,
            service.Exec(
                api.ExecProcessRequest(id="c", exec_id="late", spec=exec_spec("true")), CTX
            ),
        )
        await service.Delete(api.DeleteRequest(id="c"), CTX)

    run_scenario(tmp_path, scenario)


def test_unknown_ids_bad_ids_and_bad_specs(tmp_path: Path) -> None:
    async def scenario(service: TaskService, *_: Any) -> None:
        await expect_error(Code.NOT_FOUND, service.State(api.StateRequest(id="nope"), CTX))
        await expect_error(Code.NOT_FOUND, service.Kill(api.KillRequest(id="nope", signal=9), CTX))
        for bad in ("", "..", "a/b"):
            await expect_error(
                Code.INVALID_ARGUMENT,
                service.Create(api.CreateTaskRequest(id=bad, bundle=str(tmp_path)), CTX),
            )
        empty = tmp_path / "empty"
        empty.mkdir()
        error = await expect_error(
            Code.INVALID_ARGUMENT,
            service.Create(api.CreateTaskRequest(id="x", bundle=str(empty)), CTX),
        )
        assert "config.json" in error.message
        await create(service, tmp_path, "c", "sleep", "30")
        await service.Start(api.StartRequest(id="c"), CTX)
        await expect_error(
            Code.NOT_FOUND, service.State(api.StateRequest(id="c", exec_id="ghost"), CTX)
        )
        for exec_id in ("../x", "a/b"):
            await expect_error(
                Code.INVALID_ARGUMENT,
                service.Exec(
                    api.ExecProcessRequest(id="c", exec_id=exec_id, spec=exec_spec("true")), CTX
                ),
            )
        not_json = AnyProto(type_url="x", value=b"{not json")
        await expect_error(
            Code.INVALID_ARGUMENT,
            service.Exec(api.ExecProcessRequest(id="c", exec_id="e", spec=not_json), CTX),
        )
        await service.Exec(api.ExecProcessRequest(id="c", exec_id="e", spec=exec_spec("true")), CTX)
        await expect_error(
            Code.ALREADY_EXISTS,
            service.Exec(api.ExecProcessRequest(id="c", exec_id="e", spec=exec_spec("true")), CTX),
        )
        await expect_error(
            Code.FAILED_PRECONDITION,
            service.Kill(api.KillRequest(id="c", exec_id="e", signal=9), CTX),
        )
        state = await service.State(api.StateRequest(id="c"), CTX)
        os.kill(state.pid, signal.SIGKILL)
        await service.Wait(api.WaitRequest(id="c"), CTX)
        await service.Delete(api.DeleteRequest(id="c"), CTX)

    run_scenario(tmp_path, scenario)


def test_exec_exits_are_published_before_the_init_exit(tmp_path: Path) -> None:
    async def scenario(service: TaskService, events: RecordingPublisher, *_: Any) -> None:
        await create(service, tmp_path, "c", "sleep", "30")
        await service.Start(api.StartRequest(id="c"), CTX)
        for n in range(5):
            request = api.ExecProcessRequest(id="c", exec_id=f"e{n}", spec=exec_spec("sleep", "30"))
            await service.Exec(request, CTX)
            await service.Start(api.StartRequest(id="c", exec_id=f"e{n}"), CTX)
        init = await service.State(api.StateRequest(id="c"), CTX)
        os.kill(init.pid, signal.SIGKILL)
        await service.Wait(api.WaitRequest(id="c"), CTX)
        exits = [e for e in events.events if type(e).__name__ == "TaskExit"]
        assert [e.id for e in exits][-1] == "c"  # type: ignore[attr-defined]
        assert sorted(e.id for e in exits[:-1]) == [f"e{n}" for n in range(5)]  # type: ignore[attr-defined]
        for n in range(5):
            await service.Delete(api.DeleteRequest(id="c", exec_id=f"e{n}"), CTX)
        await service.Delete(api.DeleteRequest(id="c"), CTX)

    run_scenario(tmp_path, scenario)


def test_exec_whose_stdio_cannot_be_opened_fails_start_and_its_wait_returns(
    tmp_path: Path,
) -> None:
    async def scenario(service: TaskService, *_: Any) -> None:
        await create(service, tmp_path, "c", "sleep", "30")
        await service.Start(api.StartRequest(id="c"), CTX)
        (tmp_path / "blocker").write_text("a file where the log's directory would be")
        request = api.ExecProcessRequest(
            id="c", exec_id="e", stdout=f"file://{tmp_path}/blocker/out.log", spec=exec_spec("true")
        )
        await service.Exec(request, CTX)
        waiting = asyncio.ensure_future(service.Wait(api.WaitRequest(id="c", exec_id="e"), CTX))
        with pytest.raises(OSError):
            await service.Start(api.StartRequest(id="c", exec_id="e"), CTX)
        assert (await waiting).exit_status == 255
        await service.Delete(api.DeleteRequest(id="c", exec_id="e"), CTX)
        init = await service.State(api.StateRequest(id="c"), CTX)
        os.kill(init.pid, signal.SIGKILL)
        await service.Wait(api.WaitRequest(id="c"), CTX)
        await service.Delete(api.DeleteRequest(id="c"), CTX)

    run_scenario(tmp_path, scenario)


def test_many_concurrent_execs_each_get_their_exit_status(tmp_path: Path) -> None:
    async def scenario(service: TaskService, events: RecordingPublisher, *_: Any) -> None:
        await create(service, tmp_path, "c", "sleep", "30")
        await service.Start(api.StartRequest(id="c"), CTX)

        async def one(n: int) -> int:
            exec_id = f"e{n}"
            spec = exec_spec("sh", "-c", f"exit {n % 256}")
            await service.Exec(api.ExecProcessRequest(id="c", exec_id=exec_id, spec=spec), CTX)
            waiting = asyncio.ensure_future(
                service.Wait(api.WaitRequest(id="c", exec_id=exec_id), CTX)
            )
            await service.Start(api.StartRequest(id="c", exec_id=exec_id), CTX)
            status = int((await waiting).exit_status)
            await service.Delete(api.DeleteRequest(id="c", exec_id=exec_id), CTX)
            return status

        statuses = await asyncio.gather(*(one(n) for n in range(100)))
        assert statuses == [n % 256 for n in range(100)]
        started = [e for e in events.events if type(e).__name__ == "TaskExecStarted"]
        exits = [e for e in events.events if type(e).__name__ == "TaskExit"]
        assert len(started) == len(exits) == 100
        for event in exits:  # each exec's exit comes after its start event
            index = events.events.index(event)
            start = next(e for e in started if e.exec_id == event.id)  # type: ignore[attr-defined]
            assert events.events.index(start) < index
        state = await service.State(api.StateRequest(id="c"), CTX)
        os.kill(state.pid, signal.SIGKILL)
        await service.Wait(api.WaitRequest(id="c"), CTX)
        await service.Delete(api.DeleteRequest(id="c"), CTX)

    run_scenario(tmp_path, scenario)


def test_unsupported_operation_raises_not_implemented(tmp_path: Path) -> None:
    async def scenario(service: TaskService, *_: Any) -> None:
        await create(service, tmp_path, "c", "sleep", "30")
        await service.Start(api.StartRequest(id="c"), CTX)
        with pytest.raises(NotImplementedError):
            await service.Pause(api.PauseRequest(id="c"), CTX)
        state = await service.State(api.StateRequest(id="c"), CTX)
        assert state.status == 2  # a failed pause leaves it RUNNING
        os.kill(state.pid, signal.SIGKILL)
        await service.Wait(api.WaitRequest(id="c"), CTX)
        await service.Delete(api.DeleteRequest(id="c"), CTX)

    run_scenario(tmp_path, scenario)


def test_shutdown_waits_for_the_last_container(tmp_path: Path) -> None:
    requested: list[bool] = []

    async def main() -> None:
        reaper = Reaper.install(asyncio.get_running_loop())
        runtime = FakeRuntime(ShimContext("test", "io.containerd.fake.v1", reaper))
        service = TaskService(runtime, RecordingPublisher(), lambda: requested.append(True))

        async def stop_and_delete(name: str) -> None:
            await service.Start(api.StartRequest(id=name), CTX)
            state = await service.State(api.StateRequest(id=name), CTX)
            os.kill(state.pid, signal.SIGKILL)
            await service.Wait(api.WaitRequest(id=name), CTX)
            await service.Delete(api.DeleteRequest(id=name), CTX)
            await asyncio.sleep(0.05)

        try:
            # As ctr with containerd 1.x: Delete, then Shutdown.
            await create(service, tmp_path, "a", "sleep", "30")
            await stop_and_delete("a")
            assert requested == []
            await service.Shutdown(api.ShutdownRequest(id="a"), CTX)
            await asyncio.sleep(0.05)
            assert requested == [True]
            # A pod on containerd 2.x: the one Shutdown (after the sandbox's Delete) overtook
            # a container's Delete; the shim goes with that last Delete.
            requested.clear()
            for name in ("pause", "app"):
                await create(service, tmp_path, name, "sleep", "30")
            await stop_and_delete("pause")
            await service.Shutdown(api.ShutdownRequest(id="pause"), CTX)
            await asyncio.sleep(0.05)
            assert requested == [], "a container remains"
            await stop_and_delete("app")
            assert requested == [True]
        finally:
            await service.close()
            reaper.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


class FailingRestore(FakeContainer):
    """A restore whose runtime command fails at Start."""

    async def create(self) -> Launched | None:
        return None

    async def start(self) -> Launched | None:
        raise TtrpcError(Code.UNKNOWN, "OCI runtime restore failed")


def test_failed_restore_ends_the_init_so_that_wait_and_delete_work(tmp_path: Path) -> None:
    async def scenario(service: TaskService, _: Any, runtime: FakeRuntime, path: Path) -> None:
        runtime.container = lambda config: FailingRestore(runtime.context.reaper, config)  # type: ignore[method-assign]
        request = api.CreateTaskRequest(
            id="r", bundle=bundle(path, "r", "true"), checkpoint=str(path / "image")
        )
        assert (await service.Create(request, CTX)).pid == 0
        waiting = asyncio.ensure_future(service.Wait(api.WaitRequest(id="r"), CTX))
        await expect_error(Code.UNKNOWN, service.Start(api.StartRequest(id="r"), CTX))
        assert (await waiting).exit_status == 255
        await service.Delete(api.DeleteRequest(id="r"), CTX)

    run_scenario(tmp_path, scenario)
