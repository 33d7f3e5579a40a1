"""The QMP client against a scripted QEMU on a unix socket: greeting, capabilities, events
skipped, errors and a closed socket as QmpError; a template's wait for the agent's port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from shim.kata.boot import AGENT_PORT, Qemu, RunFiles
from shim.ttrpc.errors import TtrpcError
from shim.vm.qmp import Qmp, QmpError

GREETING = {"QMP": {"version": {}, "capabilities": []}}


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(bounded())


async def fake_qemu(
    path: Path, answer: Callable[[dict[str, Any]], list[dict[str, Any]] | None]
) -> tuple[asyncio.Server, list[dict[str, Any]]]:
    """A server that greets, then writes answer(command)'s messages per command; None closes."""
    seen: list[dict[str, Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\n")
        while line := await reader.readline():
            command = json.loads(line)
            seen.append(command)
            replies = answer(command)
            if replies is None:
                break
            writer.write(b"".join(json.dumps(r).encode() + b"\n" for r in replies))
        writer.close()

    return await asyncio.start_unix_server(serve, str(path)), seen


def test_commands_get_their_return_past_events(tmp_path: Path) -> None:
    def answer(command: dict[str, Any]) -> list[dict[str, Any]]:
        if command["execute"] == "query-migrate":
            return [{"event": "MIGRATION", "data": {}}, {"return": {"status": "completed"}}]
        return [{"return": {}}]

    async def scenario() -> tuple[Any, list[dict[str, Any]]]:
        server, seen = await fake_qemu(tmp_path / "qmp.sock", answer)
        async with server:
            qmp = await Qmp.connect(tmp_path / "qmp.sock", timeout=5)
            status = await qmp.execute("query-migrate")
            await qmp.execute("migrate", {"uri": "exec:cat > state"})
            await qmp.close()
        return status, seen

    status, seen = run(scenario())
    assert status == {"status": "completed"}
    assert [c["execute"] for c in seen] == ["qmp_capabilities", "query-migrate", "migrate"]
    assert seen[2]["arguments"] == {"uri": "exec:cat > state"}


def test_an_error_reply_and_a_closed_socket_are_qmp_errors(tmp_path: Path) -> None:
    def answer(command: dict[str, Any]) -> list[dict[str, Any]] | None:
        if command["execute"] == "migrate-incoming":
            return [{"error": {"class": "GenericError", "desc": "no such file"}}]
        if command["execute"] == "quit":
            return None
        return [{"return": {}}]

    async def scenario() -> None:
        server, _ = await fake_qemu(tmp_path / "qmp.sock", answer)
        async with server:
            qmp = await Qmp.connect(tmp_path / "qmp.sock", timeout=5)
            with pytest.raises(QmpError, match="migrate-incoming: no such file"):
                await qmp.execute("migrate-incoming", {"uri": "exec:cat state"})
            with pytest.raises(QmpError, match="closed its control socket"):
                await qmp.execute("quit")
            await qmp.close()

    run(scenario())


def test_a_socket_that_never_appears_times_out(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        run(Qmp.connect(tmp_path / "absent.sock", timeout=0.2))


def chardevs(agent_port_open: bool) -> list[dict[str, Any]]:
    return [
        {"label": "other", "filename": "", "frontend-open": True},
        {"label": AGENT_PORT, "filename": "", "frontend-open": agent_port_open},
    ]


def test_port_opened_asks_until_the_guest_has_the_port_open(tmp_path: Path) -> None:
    """A template is saved once the guest has opened the agent's port: query-chardev's
    frontend-open for the port's chardev, asked until it is true or the time is up."""
    polls: list[str] = []

    def answer(command: dict[str, Any]) -> list[dict[str, Any]]:
        if command["execute"] == "query-chardev":
            polls.append("query-chardev")
            return [{"return": chardevs(agent_port_open=len(polls) >= 3)}]
        return [{"return": {}}]

    files = RunFiles(tmp_path, tmp_path / "shared")

    async def scenario() -> None:
        server, _ = await fake_qemu(files.qmp_socket, answer)
        async with server:
            qemu = Qemu(1, asyncio.get_running_loop().create_future(), files)
            qmp = await Qmp.connect(files.qmp_socket, timeout=5)
            await qemu.port_opened(qmp, AGENT_PORT, timeout=5)
            assert len(polls) == 3
            with pytest.raises(TtrpcError, match=r"did not open port absent\.port within 0\.2 s"):
                await qemu.port_opened(qmp, "absent.port", timeout=0.2)
            await qmp.close()

    run(scenario())


def test_port_opened_says_why_qemu_exited(tmp_path: Path) -> None:
    files = RunFiles(tmp_path, tmp_path / "shared")
    files.qemu_log.write_text("qemu-system-x86_64: the reason it stopped\n")

    async def scenario() -> None:
        exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def answer(command: dict[str, Any]) -> list[dict[str, Any]] | None:
            if command["execute"] == "query-chardev":  # QEMU exits: its socket closes
                exited.set_result(None)
                return None
            return [{"return": {}}]

        server, _ = await fake_qemu(files.qmp_socket, answer)
        async with server:
            qemu = Qemu(1, exited, files)
            qmp = await Qmp.connect(files.qmp_socket, timeout=5)
            with pytest.raises(TtrpcError, match=r"QEMU exited while booting: .*reason it stopped"):
                await qemu.port_opened(qmp, AGENT_PORT, timeout=5)
            await qmp.close()

    run(scenario())
