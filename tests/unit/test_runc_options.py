"""What the runc backend keeps in its options, and how it reads another runtime's answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from shim.runtimes.base import ContainerConfig, ProcessStdio
from shim.runtimes.runc import RuncContainer, RuncOptions
from shim.sys.spawn import CommandResult
from shim.ttrpc.errors import Code, TtrpcError


def test_delete_runs_runc_only_while_runc_may_hold_the_container(tmp_path: Path) -> None:
    options = RuncOptions(root=str(tmp_path))
    assert not options.may_hold("ns", "gone")
    (tmp_path / "ns" / "alive").mkdir(parents=True)
    assert options.may_hold("ns", "alive")
    # Another OCI runtime behind the runc backend may lay out its state otherwise.
    assert RuncOptions(binary_name="/usr/bin/crun", root=str(tmp_path)).may_hold("ns", "gone")


# The runc backend against crun's answers (crun 1.8.1, Debian 12's: the guest's default runtime).


def _crun_container(tmp_path: Path, answer: CommandResult, log_line: str = "") -> RuncContainer:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if log_line:  # crun --log-format json writes its errors there, one object per line
        (bundle / "log.json").write_text(log_line + "\n")
    runtime = SimpleNamespace(context=SimpleNamespace(namespace="ns", reaper=None))
    config = ContainerConfig("c1", str(bundle), ProcessStdio(None, None, None, False), None)
    made = RuncContainer(runtime, config)  # type: ignore[arg-type]

    async def cli(*args: str, input: bytes | None = None, fds: object = None) -> CommandResult:
        return answer

    made._cli = cli  # type: ignore[method-assign]
    return made


def test_a_command_the_runtime_lacks_is_unimplemented(tmp_path: Path) -> None:
    # As crun without CRIU answers `checkpoint`, on stderr only.
    crun = _crun_container(tmp_path, CommandResult(1, b"", b"unknown command update\n"))
    with pytest.raises(TtrpcError) as raised:
        asyncio.run(crun.update({"pids": {"limit": 10}}))
    assert raised.value.code == Code.UNIMPLEMENTED
    assert "runc has no update command" in raised.value.message  # the binary's name


def test_crun_kill_of_a_container_it_does_not_know_is_not_found(tmp_path: Path) -> None:
    message = "error opening file `/run/crun/agent/c1/status`: No such file or directory"
    answer = CommandResult(1, b"", message.encode() + b"\n")
    crun = _crun_container(tmp_path, answer, json.dumps({"msg": message, "level": "error"}))
    with pytest.raises(TtrpcError) as raised:
        asyncio.run(crun.kill(9, all_processes=False))
    assert (raised.value.code, raised.value.message) == (
        Code.NOT_FOUND,
        "no such container: not found",
    )
