"""The runsc backend's pure parts: runsc.toml through runtime options, stats conversion, the
OCI-CLI error reader it shares with runc, and how a pod's sub-container learns its exit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any

from shim.api.cgroups.v1 import metrics_pb2 as v1
from shim.api.cgroups.v2 import metrics_pb2 as v2
from shim.api.runtimeoptions.v1.api_pb2 import Options
from shim.runtimes import runsc
from shim.runtimes.oci import last_runtime_error
from shim.runtimes.runsc import (
    CONTAINER_TYPE,
    INTERNAL_ERROR_STATUS,
    SANDBOX_ID,
    RunscOptions,
    SubcontainerExit,
    metrics_from_runsc,
    sandbox_of,
    wait_status,
)
from shim.sys.reaper import Exit
from shim.sys.spawn import CommandResult
from shim.ttrpc.errors import Code, TtrpcError

NO_NETNS_SPEC = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}}
CNI_SPEC = {"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/x"}]}}


def runtime_options(config_path: Path, type_url: str = "") -> Any:
    value = Options(type_url=type_url, config_path=str(config_path)).SerializeToString()
    return Any(type_url="runtimeoptions.v1.Options", value=value)


def test_runsc_toml_flags_become_global_flags_with_the_id_expanded(tmp_path: Path) -> None:
    config = tmp_path / "runsc.toml"
    config.write_text(
        'binary_name = "/opt/runsc"\nroot = "/r"\n'
        '[runsc_config]\ndebug = true\ndebug-log = "/logs/%ID%/"\nplatform = "ptrace"\n'
    )

    options = RunscOptions.for_container(runtime_options(config), "c1", NO_NETNS_SPEC)

    args = options.global_args("ns", "/bundle")
    assert args[:3] == ["/opt/runsc", "--root", "/r/ns"]
    assert args[-4:] == [
        "--debug=true",
        "--debug-log=/logs/c1/",
        "--platform=ptrace",
        "--network=none",
    ]


def test_a_network_namespace_to_join_keeps_the_sandbox_network() -> None:
    assert "network" not in RunscOptions.for_container(None, "c1", CNI_SPEC).flags
    assert RunscOptions.for_container(None, "c1", NO_NETNS_SPEC).flags == {"network": "none"}


def test_configured_network_wins(tmp_path: Path) -> None:
    config = tmp_path / "runsc.toml"
    config.write_text('[runsc_config]\nnetwork = "host"\n')

    options = RunscOptions.for_container(runtime_options(config), "c1", NO_NETNS_SPEC)

    assert options.flags == {"network": "host"}


def test_foreign_option_types_are_ignored(tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text("[runsc_config]\ndebug = true\n")
    runc_options = Any(type_url="containerd.runc.v1.Options", value=b"")

    assert RunscOptions.for_container(runc_options, "c1", CNI_SPEC) == RunscOptions()
    other = runtime_options(config, type_url="io.containerd.kata.v2.options")
    assert RunscOptions.for_container(other, "c1", CNI_SPEC) == RunscOptions()


def test_a_missing_or_broken_config_file_is_invalid_argument(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[runsc_config\n")
    for path in (tmp_path / "missing.toml", broken):
        with pytest.raises(TtrpcError) as raised:
            RunscOptions.for_container(runtime_options(path), "c1", CNI_SPEC)
        assert raised.value.code == Code.INVALID_ARGUMENT
        assert str(path) in str(raised.value)


def test_saved_options_load_back(tmp_path: Path) -> None:
    options = RunscOptions(binary_name="/opt/runsc", flags={"network": "none"})
    options.save(str(tmp_path))

    assert RunscOptions.load(str(tmp_path)) == options
    assert RunscOptions.load(str(tmp_path / "gone")) == RunscOptions()


STATS = {
    "cpu": {"usage": {"total": 5_000_000, "kernel": 1_000_000, "user": 4_000_000}},
    "memory": {"usage": {"usage": 2457600, "limit": 0}, "swap": {"usage": 7}},
    "pids": {"current": 2},
}


def test_stats_as_cgroup_v1_metrics() -> None:
    converted = metrics_from_runsc(STATS, 1)

    assert converted.type_url == "io.containerd.cgroups.v1.Metrics"
    metrics = v1.Metrics.FromString(converted.value)
    assert metrics.cpu.usage.total == 5_000_000
    assert metrics.memory.usage.usage == 2457600
    assert metrics.memory.swap.usage == 7
    assert metrics.pids.current == 2


def test_stats_as_cgroup_v2_metrics() -> None:
    converted = metrics_from_runsc(STATS, 2)

    assert converted.type_url == "io.containerd.cgroups.v2.Metrics"
    metrics = v2.Metrics.FromString(converted.value)
    assert (metrics.cpu.usage_usec, metrics.cpu.system_usec) == (5000, 1000)
    assert metrics.memory.usage == 2457600
    assert metrics.pids.current == 2


def test_runtime_error_from_back_to_back_json_log(tmp_path: Path) -> None:
    # runsc writes its JSON log entries without newlines between them; runc one per line.
    (tmp_path / "log.json").write_text(
        '{"msg":"first","level":"error"}{"msg":"noise","level":"info"}'
        '{"msg":"last one","level":"error"}\n{"msg":"torn'
    )

    assert last_runtime_error(str(tmp_path)) == "last one"


SANDBOX_SPEC = {"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod"}}
APP_SPEC = {"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "pod"}}


def test_only_a_cri_app_container_is_a_sub_container() -> None:
    assert sandbox_of("app", APP_SPEC) == "pod"
    assert sandbox_of("pod", SANDBOX_SPEC) is None
    assert sandbox_of("pod", APP_SPEC) is None  # names itself: its own sandbox
    assert sandbox_of("c1", {}) is None


def result(status: int, stdout: bytes = b"") -> CommandResult:
    return CommandResult(status, stdout, b"")


def test_wait_status_is_what_runsc_wait_printed() -> None:
    assert wait_status(result(0, b'{"id":"app","exitStatus":7}\n')) == 7
    assert wait_status(result(128)) is None  # could not reach the sandbox
    assert wait_status(result(0, b"garbage")) is None


SANDBOX_PID = 4242


async def _exit_of(wait: CommandResult | None, sandbox_status: int | None = None) -> Exit:
    """A sub-container's exit when `runsc wait` gives `wait` (None: never started) and the
    sandbox exits with `sandbox_status` (None: keeps running)."""
    loop = asyncio.get_running_loop()
    sandbox: asyncio.Future[Exit] = loop.create_future()
    exit = SubcontainerExit(SANDBOX_PID, sandbox)
    if wait is not None:
        waited: asyncio.Future[CommandResult] = loop.create_future()
        waited.set_result(wait)
        exit.follow(waited, _record_kill)
    if sandbox_status is not None:
        sandbox.set_result(Exit(SANDBOX_PID, sandbox_status, 1))
    return await asyncio.wait_for(exit.future, 5)


KILLS: list[str] = []


async def _record_kill() -> None:
    KILLS.append("kill --all 9")


def test_a_sub_container_exit_is_runsc_waits_with_the_sandbox_pid() -> None:
    exit = asyncio.run(_exit_of(result(0, b'{"exitStatus":3}')))

    assert (exit.pid, exit.status) == (SANDBOX_PID, 3)


def test_a_dead_sandbox_gives_its_status_to_its_sub_containers() -> None:
    assert asyncio.run(_exit_of(result(128), sandbox_status=137)).status == 137
    assert asyncio.run(_exit_of(None, sandbox_status=137)).status == 137  # never started


def test_a_failed_wait_with_the_sandbox_alive_kills_the_container(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runsc, "SANDBOX_EXIT_GRACE", 0.01)
    KILLS.clear()

    exit = asyncio.run(_exit_of(result(128)))

    assert (exit.status, KILLS) == (INTERNAL_ERROR_STATUS, ["kill --all 9"])


def test_closing_a_sub_container_ends_its_wait_as_killed() -> None:
    async def scenario() -> tuple[Exit, bool]:
        sandbox: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        exit = SubcontainerExit(SANDBOX_PID, sandbox)
        never: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        exit.follow(never, _record_kill)
        await asyncio.sleep(0)
        exit.close()
        await asyncio.sleep(0)
        return exit.future.result(), never.cancelled()

    final, wait_cancelled = asyncio.run(scenario())
    assert final.status == 137 and wait_cancelled


def test_a_wait_that_cannot_run_still_ends_the_sub_container() -> None:
    """`runsc wait` not started at all (no binary, no fds): the exit is still published."""

    async def scenario() -> Exit:
        loop = asyncio.get_running_loop()
        exit = SubcontainerExit(SANDBOX_PID, loop.create_future())
        failed: asyncio.Future[CommandResult] = loop.create_future()
        failed.set_exception(OSError(24, "Too many open files"))
        exit.follow(failed, _record_kill)
        return await asyncio.wait_for(exit.future, 5)

    assert asyncio.run(scenario()).status == INTERNAL_ERROR_STATUS
