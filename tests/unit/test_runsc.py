"""The runsc backend's pure parts: runsc.toml through runtime options, stats conversion, the
OCI-CLI error reader it shares with runc, and how a pod's sub-container learns its exit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any as AnyValue

import pytest
from google.protobuf.any_pb2 import Any

from shim.api.cgroups.v1 import metrics_pb2 as v1
from shim.api.cgroups.v2 import metrics_pb2 as v2
from shim.api.runtimeoptions.v1.api_pb2 import Options
from shim.runtimes import runsc, runsc_spec
from shim.runtimes.base import CheckpointRequest, ContainerConfig
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
from shim.sys.cgroups import Cgroup
from shim.sys.reaper import Exit
from shim.sys.spawn import CommandResult
from shim.ttrpc.errors import Code, TtrpcError

NO_NETNS_SPEC = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}}
HOST_NETWORK_SPEC = {"linux": {"namespaces": [{"type": "pid"}]}}
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


def test_the_network_mode_follows_the_specs_network_namespace() -> None:
    # A netns set up for the pod (CNI): gVisor's netstack, runsc's default.
    assert "network" not in RunscOptions.for_container(None, "c1", CNI_SPEC).flags
    # A new, empty netns: loopback only.
    assert RunscOptions.for_container(None, "c1", NO_NETNS_SPEC).flags == {"network": "none"}
    # None at all (hostNetwork, --net-host): the host's network, as with runc.
    assert RunscOptions.for_container(None, "c1", HOST_NETWORK_SPEC).flags == {"network": "host"}
    # A new netns that a hook sets up (Docker's bridge: libnetwork-setkey): the netstack.
    hook = {"path": "/usr/bin/dockerd", "args": ["libnetwork-setkey", "-exec-root=/x", "c1"]}
    docker_bridge = {**NO_NETNS_SPEC, "hooks": {"prestart": [hook]}}
    assert "network" not in RunscOptions.for_container(None, "c1", docker_bridge).flags


def test_network_fallback_is_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "runsc.toml"
    config.write_text('network_fallback = "host"\n[runsc_config]\n')
    options = RunscOptions.for_container(runtime_options(config), "c1", CNI_SPEC)
    assert (options.network_fallback, options.config_path) == ("host", str(config))
    assert "network" not in options.flags  # the netstack stays where it works

    config.write_text('network_fallback = "sandbox"\n')
    with pytest.raises(TtrpcError) as raised:
        RunscOptions.for_container(runtime_options(config), "c1", CNI_SPEC)
    assert raised.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("output", "date"),
    [
        ("runsc version 0.0~20221219.0\nspec: 1.0.2-dev\n", 20221219),  # Debian 12
        ("runsc version release-20240807.0\nspec: 1.1.0\n", 20240807),
        ("runsc version 6f8d2b0ab1f7\nspec: 1.0.1-dev\n", None),  # a build from a commit
    ],
)
def test_release_dates_from_runsc_version(output: str, date: int | None) -> None:
    assert runsc.release_date(output) == date


def test_the_netstack_refusal_names_cause_and_settings() -> None:
    message = runsc.netstack_refused_message("runsc", 20221219, "/etc/containerd/runsc.toml")
    for text in ("10704", "rmem_default", "release-20240807.0", "/etc/containerd/runsc.toml"):
        assert text in message
    assert 'network_fallback = "host"' in message and 'network = "host"' in message


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


# RunscContainer against a fake runsc CLI: every command goes through `_cli`, which the tests
# replace on the instance with a script of results by command name (default: success).


class FakeRunsc:
    def __init__(self, results: dict[str, CommandResult] | None = None) -> None:
        self.results = results or {}
        self.calls: list[tuple[str, ...]] = []

    async def __call__(
        self, *args: str, input: bytes | None = None, fds: object = None
    ) -> CommandResult:
        self.calls.append(args)
        return self.results.get(args[0], result(0))


def container(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli: FakeRunsc | None,
    container_id: str = "c1",
    spec: Mapping[str, object] | None = None,
    runtime: runsc.RunscRuntime | None = None,
) -> runsc.RunscContainer:
    """cli None: the container's own `_cli`, running oci.run_command."""
    bundle = tmp_path / container_id
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec or {}))
    context = SimpleNamespace(namespace="ns", reaper=None)
    runtime = runtime or runsc.RunscRuntime(context)  # type: ignore[arg-type]
    config = ContainerConfig(container_id, str(bundle), runsc.NO_STDIO, None)
    made = runsc.RunscContainer(runtime, config)
    if cli is not None:
        monkeypatch.setattr(made, "_cli", cli)
    made._pid = SANDBOX_PID
    made._started = True  # as if created and started; tests of the steps before undo it
    return made


def test_sigkill_of_a_paused_container_resumes_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = FakeRunsc()
    paused = container(tmp_path, monkeypatch, cli)

    async def scenario() -> None:
        await paused.pause()
        await paused.kill(signal.SIGKILL, all_processes=False)

    asyncio.run(scenario())

    assert cli.calls == [("pause", "c1"), ("resume", "c1"), ("kill", "c1", "9")]


def test_sigkill_of_an_exec_in_a_paused_container_resumes_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = FakeRunsc()
    paused = container(tmp_path, monkeypatch, cli)
    paused._execs["e1"] = runsc._Exec(host_pid=3001, sandbox_pid=7)

    async def scenario() -> bool:
        await paused.pause()
        return await paused.kill_exec("e1", signal.SIGKILL)

    assert asyncio.run(scenario())
    assert cli.calls[1:] == [("resume", "c1"), ("kill", "--pid", "7", "c1", "9")]


@pytest.mark.parametrize("target", ["init", "exec"])
def test_other_signals_to_a_paused_container_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    cli = FakeRunsc()
    paused = container(tmp_path, monkeypatch, cli)
    paused._execs["e1"] = runsc._Exec(host_pid=3001, sandbox_pid=7)

    async def scenario() -> None:
        await paused.pause()
        if target == "init":
            await paused.kill(signal.SIGTERM, all_processes=False)
        else:
            await paused.kill_exec("e1", signal.SIGTERM)

    with pytest.raises(TtrpcError) as raised:
        asyncio.run(scenario())

    assert raised.value.code == Code.FAILED_PRECONDITION
    assert cli.calls == [("pause", "c1")]  # neither resumed nor signalled


def test_pids_are_the_host_processes_carrying_the_sandbox_pids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = FakeRunsc({"ps": result(0, b"[7, 1, 5, 9]")})
    running = container(tmp_path, monkeypatch, cli)
    running._execs["e1"] = runsc._Exec(host_pid=3001, sandbox_pid=7)

    # 7 is the exec's (its waiter carries it); 1, 5 and 9 live in the sandbox process.
    assert asyncio.run(running.pids()) == [3001, SANDBOX_PID]


NO_UPDATE = CommandResult(2, b"", b"Usage: runsc <flags> <subcommand> <subcommand args>\n")
RESOURCES = {"memory": {"limit": 64 << 20}, "pids": {"limit": 100}}


class RacingRunsc:
    """runsc's `delete` as it treats state files (gVisor's runsc/container): a container's
    delete removes its state and lock; a sub-container's then lists its sandbox's state files
    and locks each to read it, with flock's open(O_CREAT). The listing container's delete
    holds between the two until `go_on`, so that another delete removes what it listed."""

    def __init__(self, root: Path, listing: str) -> None:
        self.root = root
        self.listing = listing
        self.listed = asyncio.Event()
        self.other_deleted = asyncio.Event()
        self.go_on = asyncio.Event()

    async def __call__(self, reaper: object, argv: list[str], **_: object) -> CommandResult:
        command, container_id = argv[-2:]
        assert command == "delete"
        for extension in ("state", "lock"):
            (self.root / f"{container_id}_sandbox:pod.{extension}").unlink()
        if container_id != self.listing:
            self.other_deleted.set()
            return result(0)
        states = list(self.root.glob("*_sandbox:pod.state"))
        self.listed.set()
        await self.go_on.wait()
        for state in states:
            state.with_suffix(".lock").touch()
        return result(0)


@pytest.mark.parametrize("other", ["pod", "app2"])
def test_a_lock_runsc_recreates_after_a_containers_delete_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: str
) -> None:
    """containerd 1.6 deletes a dead pod's sandbox and containers at once: a sub-container's
    `runsc delete` that listed another container's state before that one's delete removed it
    recreates its lock file after, which that container's Delete then removes."""
    root = tmp_path / "runsc"
    (root / "ns").mkdir(parents=True)
    specs = {"pod": SANDBOX_SPEC, "app": APP_SPEC, "app2": APP_SPEC}
    for name in specs:
        for extension in ("state", "lock"):
            (root / "ns" / f"{name}_sandbox:pod.{extension}").touch()
    fake = RacingRunsc(root / "ns", listing="app")
    monkeypatch.setattr(runsc.oci, "run_command", fake)
    runtime = runsc.RunscRuntime(SimpleNamespace(namespace="ns", reaper=None))  # type: ignore[arg-type]
    made = {
        name: container(tmp_path, monkeypatch, None, name, spec, runtime)
        for name, spec in specs.items()
    }
    for each in made.values():
        each.options = replace(each.options, root=str(root))

    async def scenario() -> None:
        listing_deleted = asyncio.create_task(made["app"].delete())
        await fake.listed.wait()
        other_deleted = asyncio.create_task(made[other].delete())
        await fake.other_deleted.wait()
        fake.go_on.set()
        await asyncio.gather(listing_deleted, other_deleted)

    asyncio.run(scenario())
    (untouched,) = set(specs) - {"app", other}
    left = {path.name for path in (root / "ns").iterdir()}
    assert left == {f"{untouched}_sandbox:pod.state", f"{untouched}_sandbox:pod.lock"}


class FakeCgroups:
    """What `Cgroup.for_pid` gives runsc: a cgroup v2 directory under tmp_path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.asked: list[int] = []  # the pids whose cgroup was asked for

    def for_pid(self, pid: int) -> Cgroup:
        self.asked.append(pid)
        return Cgroup(2, {"": str(self.directory)})


@pytest.fixture
def sandbox_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroups:
    (tmp_path / "cgroup").mkdir()
    cgroups = FakeCgroups(tmp_path / "cgroup")
    monkeypatch.setattr(runsc, "Cgroup", cgroups)
    return cgroups


def test_update_without_runsc_update_writes_the_sandbox_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox_cgroup: FakeCgroups
) -> None:
    cli = FakeRunsc({"update": NO_UPDATE})
    own_sandbox = container(tmp_path, monkeypatch, cli)

    asyncio.run(own_sandbox.update(RESOURCES))

    directory = sandbox_cgroup.directory
    assert cli.calls == [("update", "--resources", "-", "c1")]
    assert sandbox_cgroup.asked == [SANDBOX_PID]
    assert (directory / "memory.max").read_text() == str(64 << 20)
    assert (directory / "pids.max").read_text() == "100"


def test_update_of_a_sub_container_without_runsc_update_is_unimplemented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox_cgroup: FakeCgroups
) -> None:
    cli = FakeRunsc({"update": NO_UPDATE})
    sub_container = container(tmp_path, monkeypatch, cli, "app", APP_SPEC)

    with pytest.raises(TtrpcError) as raised:
        asyncio.run(sub_container.update(RESOURCES))

    assert raised.value.code == Code.UNIMPLEMENTED
    assert sandbox_cgroup.asked == []
    assert not any(sandbox_cgroup.directory.iterdir())


def test_a_sub_container_is_neither_checkpointed_nor_restored_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runsc would checkpoint (and stop) the whole pod, and cannot restore into a sandbox."""
    cli = FakeRunsc()
    sub_container = container(tmp_path, monkeypatch, cli, "app", APP_SPEC)
    with pytest.raises(NotImplementedError, match="whole sandboxes"):
        asyncio.run(sub_container.checkpoint(CheckpointRequest(path="/ck", options=None)))
    sub_container._config = replace(sub_container._config, checkpoint="/ck")
    with pytest.raises(NotImplementedError, match="restore of one container of the gVisor pod"):
        asyncio.run(sub_container.create())
    assert cli.calls == []


def test_a_container_never_started_is_killed_without_runsc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runsc refuses to signal a created container; its failed start must still be undone."""
    cli = FakeRunsc()
    created = container(tmp_path, monkeypatch, cli)
    created._started = False
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: killed.append((pid, signum)))

    async def scenario() -> None:
        created._sandbox_exited = asyncio.get_running_loop().create_future()
        await created.kill(signal.SIGTERM, all_processes=False)
        created._sandbox_exited.set_result(Exit(SANDBOX_PID, 137, 0))
        with pytest.raises(TtrpcError) as raised:  # the sandbox is gone
            await created.kill(signal.SIGKILL, all_processes=True)
        assert raised.value.code == Code.NOT_FOUND

    asyncio.run(scenario())
    assert killed == [(SANDBOX_PID, signal.SIGKILL)]
    assert cli.calls == []


def test_a_sub_container_never_started_exits_on_a_kill() -> None:
    async def scenario() -> Exit:
        loop = asyncio.get_running_loop()
        exit = SubcontainerExit(SANDBOX_PID, loop.create_future())
        exit.kill_unstarted(signal.SIGKILL)
        return await exit.future

    assert asyncio.run(scenario()).status == 128 + signal.SIGKILL


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs root")
def test_the_netns_probe_tells_the_initial_netns() -> None:
    # The test's own netns: setns into it changes nothing.
    if not os.path.exists(runsc.DEV_WEIGHT):
        pytest.skip("not in the initial network namespace")
    assert runsc._probe_netns("/proc/self/ns/net") == runsc.NETNS_INITIAL
    assert runsc._probe_netns("/nonexistent") == runsc.NETNS_UNREADABLE
    # Without a path, a new netns (what runsc makes for a hook to set up), in a child: the
    # probe unshares its caller.
    child = os.fork()
    if child == 0:
        os._exit(runsc._probe_netns(""))
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) in (runsc.NETNS_USABLE, runsc.NETNS_MISJUDGED)


# -- the spec adapted to the runsc (shim.runtimes.runsc_spec) ----------------------------------

PRIVILEGED_CAPS = ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_BPF"]


def fake_runsc(tmp_path: Path, strings: bytes) -> str:
    """An executable whose bytes hold `strings`, as runsc's hold its capability table."""
    binary = tmp_path / "fake-runsc"
    binary.write_bytes(b"\x7fELF....." + strings + b"\x00more")
    binary.chmod(0o755)
    return str(binary)


def test_capabilities_a_runsc_does_not_know_are_dropped_from_every_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = fake_runsc(tmp_path, b"CAP_CHOWNCAP_SYS_ADMINCAP_BPFCAP_KILL")
    sets = ("bounding", "effective", "inheritable", "permitted", "ambient")
    process: dict[str, AnyValue] = {"capabilities": {key: list(PRIVILEGED_CAPS) for key in sets}}

    changed = asyncio.run(runsc_spec.adapt_capabilities(process, binary, "c1"))

    assert changed
    for key in sets:
        assert process["capabilities"][key] == ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_BPF"]
    assert "CAP_PERFMON: dropped" in caplog.text and "c1" in caplog.text


def test_capabilities_stay_when_the_runsc_knows_them_or_cannot_tell(tmp_path: Path) -> None:
    knows = fake_runsc(tmp_path, b"CAP_CHOWNCAP_PERFMONCAP_BPF")
    process: dict[str, AnyValue] = {"capabilities": {"bounding": list(PRIVILEGED_CAPS)}}
    assert not asyncio.run(runsc_spec.adapt_capabilities(process, knows, "c1"))
    # A packed or unreadable binary tells nothing: runsc itself will judge the spec.
    packed = tmp_path / "packed"
    packed.mkdir()
    tells_nothing = fake_runsc(packed, b"UPX!")
    assert not asyncio.run(runsc_spec.adapt_capabilities(process, tells_nothing, "c1"))
    assert process["capabilities"]["bounding"] == PRIVILEGED_CAPS
    # Linux's capabilities before 5.8 are never looked up.
    assert asyncio.run(runsc_spec.unknown_capabilities("/no/such/runsc", {"CAP_CHOWN"})) == set()


def rootfs_spec(
    tmp_path: Path, paths: list[str], mounts: list[dict[str, AnyValue]]
) -> dict[str, AnyValue]:
    return {"root": {"path": "rootfs"}, "mounts": mounts, "linux": {"readonlyPaths": paths}}


def test_readonly_paths_become_read_only_bind_mounts_of_themselves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "tmp").mkdir()
    (rootfs / "escape").symlink_to("/etc")  # the image's: it must not name the host's /etc
    volume = tmp_path / "volume"
    (volume / "data").mkdir(parents=True)
    hosts: dict[str, AnyValue] = {
        "destination": "/etc/hosts",
        "type": "bind",
        "source": "/x/hosts",
        "options": ["rbind"],
    }
    mounts: list[dict[str, AnyValue]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        hosts,
        {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind"]},
    ]
    paths = ["/etc", "/vol/data", "/proc/sys", "/dev/shm", "/escape", "/missing", "tmp/../tmp"]
    spec = rootfs_spec(tmp_path, paths, [dict(m) for m in mounts])

    assert runsc_spec.readonly_binds(spec, str(tmp_path), "c1")

    def ro(destination: str, source: Path) -> dict[str, AnyValue]:
        return {"destination": destination, "type": "bind", "source": str(source),
                "options": ["rbind", "ro"]}  # fmt: skip

    assert spec["mounts"] == [
        *mounts,
        ro("/etc", rootfs / "etc"),
        hosts,  # still on top of the read-only /etc, as with runc
        ro("/vol/data", volume / "data"),
        ro("/tmp", rootfs / "tmp"),
    ]
    assert "/escape" in caplog.text and "symlink" in caplog.text
    assert "/dev/shm" in caplog.text and "stay writable" in caplog.text
    assert "/missing" not in caplog.text


def test_masked_paths_are_hidden_under_an_empty_file_or_tmpfs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "secret").write_text("secret")
    (rootfs / "escape").symlink_to("/etc")
    volume = tmp_path / "volume"
    (volume / "data").mkdir(parents=True)
    mounts: list[dict[str, AnyValue]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind"]},
    ]
    paths = ["/etc/secret", "/vol/data", "/proc/kcore", "/dev/shm", "/escape", "/missing"]
    spec: dict[str, AnyValue] = {
        "root": {"path": "rootfs"},
        "mounts": [dict(m) for m in mounts],
        "linux": {"maskedPaths": paths},
    }

    assert runsc_spec.masked_paths(spec, str(tmp_path), "c1")

    empty = tmp_path / "masked-file"
    assert spec["mounts"] == [
        *mounts,
        {"destination": "/etc/secret", "type": "bind", "source": str(empty),
         "options": ["bind", "ro"]},
        {"destination": "/vol/data", "type": "tmpfs", "source": "tmpfs",
         "options": ["ro", "nosuid", "nodev", "noexec"]},
    ]  # fmt: skip
    assert empty.read_bytes() == b"" and empty.stat().st_mode & 0o777 == 0o444
    assert "/proc/kcore" in caplog.text and "sandbox kernel" in caplog.text
    assert "/escape" in caplog.text and "symlink" in caplog.text
    assert "/dev/shm" in caplog.text and "stay visible" in caplog.text
    assert "/missing" not in caplog.text


def test_a_spec_without_readonly_paths_is_left_alone(tmp_path: Path) -> None:
    spec = rootfs_spec(tmp_path, [], [])
    assert not runsc_spec.readonly_binds(spec, str(tmp_path), "c1")
    assert not runsc_spec.masked_paths(spec, str(tmp_path), "c1")


@pytest.mark.parametrize(
    ("flags", "warned"),
    [({}, True), ({"oci-seccomp": "false"}, True), ({"oci-seccomp": "true"}, False)],
)
def test_a_seccomp_runsc_will_not_apply_is_warned_of(
    flags: dict[str, str], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    spec = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}}
    runsc_spec.warn_unapplied_seccomp(spec, flags, "c1", "/etc/runsc.toml")
    assert ("not enforced" in caplog.text) == warned
    caplog.clear()
    runsc_spec.warn_unapplied_seccomp({"linux": {}}, {}, "c1", "")
    assert not caplog.text


@pytest.mark.parametrize(("release", "warned"), [(20221219, True), (None, True), (20260330, False)])
def test_execs_left_out_of_the_seccomp_are_warned_of_by_runsc_release(
    release: int | None,
    warned: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = container(tmp_path, monkeypatch, FakeRunsc())
    monkeypatch.setitem(runsc._releases, made.options.binary_name, release)
    asyncio.run(made._warn_of_unconfined_execs())
    assert ("its execs run without it" in caplog.text) == warned


def test_the_adapted_spec_replaces_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "config.json").chmod(0o640)
    runsc_spec.write_spec(str(tmp_path), {"ociVersion": "1.0.2"})
    assert json.loads((tmp_path / "config.json").read_text()) == {"ociVersion": "1.0.2"}
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
