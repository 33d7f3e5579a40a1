"""pykata's pure logic: the VM's connect, the stdio relay, the runtime's failure paths."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from shim.agent.client import AgentClient
from shim.kata.config import KataConfig
from shim.kata.state import VmPaths
from shim.kata.vm import Vm


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
        vm = Vm(None, VmPaths(tmp_path), KataConfig())  # type: ignore[arg-type]
        vm.exited = asyncio.get_running_loop().create_future()
        booting = asyncio.ensure_future(vm._connect())
        await asyncio.sleep(0.01)
        booting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await booting
        await asyncio.sleep(0.01)
        assert cancelled == [str(tmp_path / "agent.sock")]

    run(scenario())
