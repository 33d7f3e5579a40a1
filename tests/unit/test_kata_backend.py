"""pykata's pure logic: the VM's connect, the stdio relay, the runtime's failure paths."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shim.agent.client import AgentClient
from shim.kata.boot import Qemu, RunFiles, _agent_command
from shim.kata.config import KataConfig, VmSize
from shim.kata.relay import ProcessRelay
from shim.kata.state import VmPaths
from shim.kata.vm import Vm
from shim.runtimes.base import ProcessStdio
from shim.runtimes.kata import VM_GONE_STATUS, KataContainer
from shim.sys.reaper import Exit
from shim.ttrpc.errors import Code, TtrpcError


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(bounded())


def test_connect_cancelled_cancels_the_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cancelled = []

    async def connect(cls: type, path: str, *, timeout: float = 0) -> AgentClient:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(path)
            raise
        raise AssertionError

    monkeypatch.setattr(AgentClient, "connect", classmethod(connect))

    async def scenario() -> None:
        exited = asyncio.get_running_loop().create_future()
        qemu = Qemu(42, exited, RunFiles(tmp_path, tmp_path / "shared"))
        booting = asyncio.ensure_future(qemu.agent(timeout=60))
        await asyncio.sleep(0.01)
        booting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await booting
        await asyncio.sleep(0.01)
        assert cancelled == [str(tmp_path / "agent.sock")]

    run(scenario())


class _FailingAgent:
    async def wait_process(self, container_id: str, exec_id: str) -> Any:
        raise TtrpcError(Code.INTERNAL, "agent trouble")


def _container(vm: Any) -> KataContainer:
    config = SimpleNamespace(id="c1", bundle="/nonexistent", stdio=None, checkpoint=None)
    container = KataContainer(SimpleNamespace(), config)  # type: ignore[arg-type]
    container._vm = vm
    return container


def test_a_failed_wait_in_a_running_vm_is_not_reported_as_the_vm_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> Exit:
        vm = SimpleNamespace(pid=42, netns="", agent=_FailingAgent())
        vm.exited = asyncio.get_running_loop().create_future()
        return await _container(vm)._exit_of(vm, "e1", None)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, logger="shim.runtimes.kata"):
        exit_ = run(scenario())
    assert (exit_.pid, exit_.status) == (42, VM_GONE_STATUS)
    assert "agent trouble" in caplog.text
    assert "the VM is gone" not in caplog.text


def test_a_wait_ended_by_the_vm_exit_reports_the_vm_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Waiting:
        async def wait_process(self, container_id: str, exec_id: str) -> Any:
            await asyncio.sleep(3600)

    async def scenario() -> Exit:
        vm = SimpleNamespace(pid=42, netns="", agent=Waiting())
        vm.exited = asyncio.get_running_loop().create_future()
        vm.exited.set_result(Exit(42, 137, 0))
        return await _container(vm)._exit_of(vm, "", None)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, logger="shim.runtimes.kata"):
        exit_ = run(scenario())
    assert exit_.status == VM_GONE_STATUS
    assert "c1/init: the VM is gone" in caplog.text


class _StdioAgent:
    """An agent whose process writes `output`, then ends its output."""

    def __init__(self, output: bytes = b"") -> None:
        self.output = output
        self.written = b""
        self.stdin_closed = False

    async def read_stdout(self, container_id: str, exec_id: str, offset: int) -> bytes:
        return self.output[offset:]

    read_stderr = read_stdout

    async def write_stdin(self, container_id: str, exec_id: str, offset: int, data: bytes) -> int:
        self.written += data
        return offset + len(data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        self.stdin_closed = True


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_pty_master_never_handed_out_is_closed_with_the_relay() -> None:
    async def scenario() -> None:
        relay = ProcessRelay(_StdioAgent(), "c1", "", ProcessStdio(0, None, None, True))  # type: ignore[arg-type]
        master = relay.console_master
        assert master is not None and _is_open(master)
        await relay.close()
        assert not _is_open(master)

    run(scenario())


def test_a_pty_master_handed_out_is_left_to_its_taker() -> None:
    async def scenario() -> None:
        relay = ProcessRelay(_StdioAgent(), "c1", "", ProcessStdio(0, None, None, True))  # type: ignore[arg-type]
        master = relay.hand_out_console()
        assert master is not None
        await relay.close()
        assert _is_open(master)
        os.close(master)

    run(scenario())


def test_a_failed_create_closes_the_relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[ProcessRelay] = []

    async def close(self: ProcessRelay) -> None:
        closed.append(self)

    monkeypatch.setattr(ProcessRelay, "close", close)

    class Agent:
        async def create_container(self, *args: Any, **kwargs: Any) -> int:
            raise TtrpcError(Code.INTERNAL, "no")

    async def scenario() -> None:
        vm = SimpleNamespace(pid=42, netns="", agent=Agent(), share=lambda *a: None, paths=None)

        async def join(config: Any, spec: Any) -> Any:
            return vm

        runtime = SimpleNamespace(join=join, guest_pids={})
        container = KataContainer(runtime, config)  # type: ignore[arg-type]
        with pytest.raises(TtrpcError):
            await container.create()
        assert len(closed) == 1 and container._relays == {}

    bundle = tmp_path
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    config = SimpleNamespace(
        id="c1",
        bundle=str(bundle),
        checkpoint=None,
        stdio=ProcessStdio(None, None, None, False),
    )
    monkeypatch.setattr("shim.runtimes.kata.record_vm", lambda *a: None)
    run(scenario())


def test_a_boot_failing_before_qemu_removes_the_vm_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(kernel: Any, busybox: Path, runtime: str) -> bytes:
        raise OSError("no busybox")

    async def tcg(self: Vm, kernel: Any) -> str:
        return "tcg"

    image = SimpleNamespace(path=tmp_path / "guest.erofs", key="k", release="r")
    monkeypatch.setattr("shim.kata.vm.BASE_DIR", tmp_path)
    monkeypatch.setattr(Vm, "_assets", lambda self: (object(), image))
    monkeypatch.setattr(Vm, "_choose_accel", tcg)
    monkeypatch.setattr("shim.kata.vm._boot_image", lambda kernel: tmp_path / "vmlinux")
    monkeypatch.setattr("shim.kata.vm.guest_initrd", fail)
    vm = Vm(None, VmPaths(tmp_path / "vm"), KataConfig())  # type: ignore[arg-type]
    with pytest.raises(OSError, match="no busybox"):
        run(vm.boot(VmSize(1, 512)))
    assert not (tmp_path / "vm").exists()


def test_missing_assets_name_the_command_that_makes_them(tmp_path: Path) -> None:
    vm = Vm(None, VmPaths(tmp_path / "vm"), KataConfig(assets_dir=str(tmp_path)))  # type: ignore[arg-type]
    with pytest.raises(TtrpcError, match="pyshim assets") as raised:
        vm._assets()
    assert raised.value.code == Code.FAILED_PRECONDITION


def test_the_guest_runtime_is_crun_unless_configured_and_checked() -> None:
    assert KataConfig().guest_runtime == "crun"
    assert KataConfig.from_table({"guest_runtime": "runc"}).guest_runtime == "runc"
    with pytest.raises(TtrpcError, match="guest_runtime='youki'") as raised:
        KataConfig.from_table({"guest_runtime": "youki"})
    assert raised.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_the_agent_is_told_the_configured_runtime(runtime: str) -> None:
    command = _agent_command(runtime)
    assert f"-m shim.agent --runtime /usr/sbin/{runtime} --device $port" in command


def test_an_image_without_the_configured_runtime_names_the_package_and_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "guest-k.erofs").write_bytes(b"")
    record = {"path": "guest-k.erofs", "key": "k", "release": "r", "runtimes": ["runc"]}
    (images / "current.json").write_text(json.dumps(record))
    monkeypatch.setattr("shim.kata.vm.find_kernel", lambda root: SimpleNamespace(release="r"))
    runc = Vm(
        None, VmPaths(tmp_path / "vm"), KataConfig(assets_dir=str(tmp_path), guest_runtime="runc")
    )  # type: ignore[arg-type]
    assert runc._assets()[1].runtimes == ("runc",)
    crun = Vm(None, VmPaths(tmp_path / "vm"), KataConfig(assets_dir=str(tmp_path)))  # type: ignore[arg-type]
    with pytest.raises(TtrpcError) as raised:
        crun._assets()
    assert raised.value.code == Code.FAILED_PRECONDITION
    assert "has no crun" in raised.value.message
    assert "apt-get install crun, then run `pyshim assets`" in raised.value.message


def test_a_terminal_with_stdin_ends_its_console_with_its_output() -> None:
    async def scenario() -> bytes:
        agent = _StdioAgent(b"hello")
        # With a terminal the Task service passes no stdin end: it writes into the master.
        relay = ProcessRelay(agent, "c1", "", ProcessStdio(None, None, None, True))  # type: ignore[arg-type]
        master = relay.hand_out_console()
        assert master is not None
        os.set_blocking(master, False)
        relay.start()
        seen = b""
        try:
            async with asyncio.timeout(2):  # else the Task service's drain would time out
                while True:
                    try:
                        chunk = os.read(master, 1024)
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
                        continue
                    except OSError:  # EIO: every slave is closed
                        break
                    if not chunk:
                        break
                    seen += chunk
            await relay.drained(1)
            assert relay._input_task is not None and relay._input_task.done()
        finally:
            await relay.close()
            os.close(master)
        return seen

    assert run(scenario()) == b"hello"


def test_what_the_service_writes_into_a_terminal_reaches_the_guest_stdin() -> None:
    async def scenario() -> bytes:
        agent = _StdioAgent()
        agent.read_stdout = _never_ending  # type: ignore[method-assign]
        relay = ProcessRelay(agent, "c1", "", ProcessStdio(None, None, None, True))  # type: ignore[arg-type]
        assert relay.agent_stdio.stdin and relay.agent_stdio.terminal
        master = relay.hand_out_console()
        assert master is not None
        relay.start()
        try:
            os.write(master, b"typed\r")
            async with asyncio.timeout(2):
                while b"typed" not in agent.written:
                    await asyncio.sleep(0.01)
        finally:
            await relay.close()
            os.close(master)
        return agent.written

    assert run(scenario()) == b"typed\r"


async def _never_ending(container_id: str, exec_id: str, offset: int) -> bytes:
    await asyncio.Event().wait()
    return b""


class _SlowRelay:
    def __init__(self, closing: asyncio.Event | None = None) -> None:
        self.closing = closing
        self.closed = False

    async def close(self) -> None:
        if self.closing is not None:
            await self.closing.wait()
        self.closed = True


class _RemovingAgent:
    async def remove_process(self, container_id: str, exec_id: str) -> None:
        pass

    async def remove_container(self, container_id: str) -> None:
        pass


def test_an_exec_deleted_while_the_container_is_deleted(tmp_path: Path) -> None:
    """Docker deletes a killed container's exec and the container at once: each relay is
    closed once, and neither delete fails."""

    async def scenario() -> None:
        vm = SimpleNamespace(agent=_RemovingAgent(), paths=VmPaths(tmp_path), forget=len)
        container = _container(vm)
        container._runtime = SimpleNamespace(
            leave=lambda _id: asyncio.sleep(0), is_last=lambda _id: False
        )  # type: ignore[assignment]
        closing = asyncio.Event()
        init, exec_ = _SlowRelay(closing), _SlowRelay()
        container._relays = {"": init, "e1": exec_}  # type: ignore[dict-item]
        deleting = asyncio.ensure_future(container.delete())
        await asyncio.sleep(0)
        await container.delete_exec("e1")
        closing.set()
        await deleting
        assert (init.closed, exec_.closed, container._relays) == (True, True, {})

    run(scenario())


def test_the_vms_last_container_is_removed_with_the_vm_not_in_the_guest(tmp_path: Path) -> None:
    """runc's delete in a guest about to be killed is skipped; any other container's is not."""

    class CountingAgent(_RemovingAgent):
        def __init__(self) -> None:
            self.removed: list[str] = []

        async def remove_container(self, container_id: str) -> None:
            self.removed.append(container_id)

    async def delete(last: bool) -> list[str]:
        agent = CountingAgent()
        vm = SimpleNamespace(agent=agent, paths=VmPaths(tmp_path), forget=len)
        container = _container(vm)
        container._runtime = SimpleNamespace(  # type: ignore[assignment]
            leave=lambda _id: asyncio.sleep(0), is_last=lambda _id: last
        )
        await container.delete()
        return agent.removed

    assert run(delete(last=True)) == []
    assert run(delete(last=False)) == ["c1"]
