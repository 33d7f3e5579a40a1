"""The container bookkeeping the Task service and the guest agent share."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import cast

import pytest

from shim.runtimes.base import Container
from shim.sys.oom import OomWatcher
from shim.sys.reaper import Exit
from shim.task.container import ContainerRecord, check_new_container
from shim.task.process import Process, Status, StdioRequest
from shim.ttrpc.errors import Code, TtrpcError

NO_STDIO = StdioRequest("", "", "", False)


class FailingCleanup:
    async def on_init_exit(self) -> None:
        raise RuntimeError("runc kill failed")


class RecordingOom:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def check(self, container_id: str) -> None:
        self.calls.append(("check", container_id))

    def remove(self, container_id: str) -> None:
        self.calls.append(("remove", container_id))


def record(backend: object = None) -> ContainerRecord[Process]:
    return ContainerRecord("c1", "/bundle", cast(Container, backend), Process("c1", "", NO_STDIO))


def add_exec(container: ContainerRecord[Process], exec_id: str) -> Process:
    process = Process(container.id, exec_id, NO_STDIO)
    container.execs[exec_id] = process
    return process


def code_of(call: Callable[..., object], *args: object) -> Code | int:
    with pytest.raises(TtrpcError) as caught:
        call(*args)
    return caught.value.code


def test_a_container_id_kept_or_being_created_is_refused() -> None:
    assert code_of(check_new_container, "c1", {"c1": object()}, set()) == Code.ALREADY_EXISTS
    assert code_of(check_new_container, "c1", {}, {"c1"}) == Code.ALREADY_EXISTS
    assert code_of(check_new_container, "..", {}, set()) == Code.INVALID_ARGUMENT
    check_new_container("c2", {"c1": object()}, {"c3"})


def test_an_exec_needs_a_new_id_and_an_init_not_stopped() -> None:
    container = record()
    add_exec(container, "e1")
    assert code_of(container.check_new_exec, "e1") == Code.ALREADY_EXISTS
    assert code_of(container.check_new_exec, "a/b") == Code.INVALID_ARGUMENT
    container.check_new_exec("e2")
    container.init.status = Status.STOPPED
    assert code_of(container.check_new_exec, "e2") == Code.FAILED_PRECONDITION


def test_an_unknown_exec_id_is_not_found_and_none_is_the_init() -> None:
    container = record()
    assert container.process("") is container.init
    assert code_of(container.process, "e1") == Code.NOT_FOUND


def test_only_running_execs_name_pids() -> None:
    container = record()
    add_exec(container, "reserved")  # its runtime call still running: no pid yet
    running = add_exec(container, "running")
    running.launched(os.getpid())
    exited = add_exec(container, "exited")
    exited.launched(os.getppid())
    exited.set_exited(Exit(os.getppid(), 0, 1))
    try:
        assert container.exec_ids_by_pid() == {os.getpid(): "running"}
    finally:
        running.forget()


def test_a_failed_cleanup_after_the_init_still_ends_its_oom_watch() -> None:
    container = record(FailingCleanup())
    oom = RecordingOom()
    asyncio.run(container.init_exited(cast(OomWatcher, oom)))
    assert oom.calls == [("check", "c1"), ("remove", "c1")]
