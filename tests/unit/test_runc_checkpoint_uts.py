"""The runc backend's checkpoint runs `runc checkpoint` (and so CRIU) inside a UTS namespace
the container joined by path, a pod's, so that the image leaves it, and its hostname, out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shim.runtimes import runc
from shim.runtimes.base import CheckpointRequest, ContainerConfig, ProcessStdio
from shim.runtimes.runc import RuncContainer
from shim.sys.spawn import CommandResult


def dumped_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uts: dict[str, str]) -> list[str]:
    """The command line the checkpoint of a container whose spec has this UTS namespace ran."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "uts", **uts}]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    runtime = SimpleNamespace(context=SimpleNamespace(namespace="ns", reaper=None))
    config = ContainerConfig("c1", str(bundle), ProcessStdio(None, None, None, False), None)
    container = RuncContainer(runtime, config)  # type: ignore[arg-type]
    commands: list[list[str]] = []

    async def run_command(reaper: Any, argv: list[str], **kwargs: Any) -> CommandResult:
        commands.append(argv)
        return CommandResult(0, b"", b"")

    monkeypatch.setattr(runc, "run_command", run_command)
    monkeypatch.setattr(runc.oci, "run_command", run_command)
    asyncio.run(container.checkpoint(CheckpointRequest(str(tmp_path / "image"), None)))
    (argv,) = commands
    return argv


def test_a_pod_s_uts_namespace_is_entered_for_the_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = dumped_argv(tmp_path, monkeypatch, {"path": "/proc/42/ns/uts"})
    assert argv[:3] == ["nsenter", "--uts=/proc/42/ns/uts", "--"]
    assert argv[3:5] == ["runc", "--root"] and "checkpoint" in argv


def test_a_container_s_own_uts_namespace_is_dumped_from_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = dumped_argv(tmp_path, monkeypatch, {})
    assert argv[0] == "runc" and "checkpoint" in argv
