"""What the kubelet does with a pod, per CRI runtime handler: our three shims, and containerd's
own runc shim (`runc`) as the reference every behaviour is held to.

Each handler gets a Workload: the image and the commands that print, sleep or handle SIGTERM
on it (busybox for the Linux handlers, the WASI test programs for pywasm).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as api
from cri_client import CriClient, Pod
from harness import PrivateContainerd, wait_until
from runsc_support import require_runsc
from vm_support import require_vm

from shim.sys.cgroup_limits import cpu_weight

pytestmark = pytest.mark.timeout(240)

HANDLERS = ["pyrunc", "pyrunsc", "pywasm", "pykata", "runc"]
LINUX_HANDLERS = ["pyrunc", "pyrunsc", "runc"]
RUNNING = api.ContainerState.CONTAINER_RUNNING
MiB = 1024 * 1024


@dataclass(frozen=True)
class Workload:
    image: str
    say: Callable[[str, str, int], list[str]]  # stdout line, stderr line, exit code
    sleep: list[str]  # runs until stopped
    tick: list[str]  # prints a numbered line every 0.2 s


def linux_workload(image: str) -> Workload:
    return Workload(
        image=image,
        say=lambda out, err, code: ["sh", "-c", f"echo {out}; echo {err} >&2; exit {code}"],
        sleep=["sleep", "100000"],
        tick=["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.2; done"],
    )


def wasm_workload(image: str) -> Workload:
    return Workload(
        image=image,
        say=lambda out, err, code: ["/say.wasm", out, err, str(code)],
        sleep=["/sleep.wasm"],
        tick=["/tick.wasm"],
    )


@pytest.fixture(params=HANDLERS)
def handler(request: pytest.FixtureRequest) -> str:
    if request.param == "pyrunsc":
        require_runsc()
    if request.param == "pykata":
        require_vm()
    return str(request.param)


@pytest.fixture
def workload(
    handler: str, containerd: PrivateContainerd, request: pytest.FixtureRequest
) -> Workload:
    if handler == "pywasm":
        return wasm_workload(request.getfixturevalue("wasm_image"))
    return linux_workload(containerd.image)


@pytest.fixture(params=LINUX_HANDLERS)
def linux_handler(request: pytest.FixtureRequest) -> str:
    if request.param == "pyrunsc":
        require_runsc()
    return str(request.param)


def log_has(cri: CriClient, pod: Pod, container_id: str, *expected: tuple[str, str, str]) -> bool:
    """Whether the CRI log file holds these (stream, tag, message) lines (containerd writes it
    from our FIFOs a moment after the output happened)."""

    def present() -> bool:
        lines = cri.log_lines(pod, container_id)
        return all(line in lines for line in expected)

    return wait_until(present, timeout=10, interval=0.1)


def grpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_pod_runs_a_container_and_reports_its_exit_and_logs(
    cri: CriClient, handler: str, workload: Workload
) -> None:
    pod = cri.run_pod(handler)
    assert cri.pod_status(pod).status.state == cri_state_ready()
    container = cri.run_container(pod, workload.image, workload.say("to-out", "to-err", 3))
    status = cri.wait_exited(container)
    assert (status.exit_code, status.reason) == (3, "Error")
    # Not ordered against each other: containerd stamps started_at after Start returns, by
    # when so short a process may have exited.
    assert status.started_at > 0 and status.finished_at > 0
    assert log_has(cri, pod, container, ("stdout", "F", "to-out"), ("stderr", "F", "to-err"))
    for _ in range(2):  # the kubelet retries both: each must be idempotent
        cri.stop_pod(pod)
    assert cri.pod_status(pod).status.state == api.PodSandboxState.SANDBOX_NOTREADY
    for _ in range(2):
        cri.remove_pod(pod)
    error = grpc_error(lambda: cri.pod_status(pod))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def cri_state_ready() -> int:
    return int(api.PodSandboxState.SANDBOX_READY)


def test_one_shim_serves_the_pod(
    containerd: PrivateContainerd, cri: CriClient, handler: str, workload: Workload
) -> None:
    pod = cri.run_pod(handler)
    containers = [cri.run_container(pod, workload.image, workload.sleep) for _ in range(3)]
    assert all(cri.state(c) == RUNNING for c in containers)
    assert len(containerd.shim_pids()) == 1, "the pause and three app containers share a shim"
    # Removing one container disturbs neither its siblings nor the pod.
    cri.stop_container(containers[0], grace=1)
    cri.remove_container(containers[0])
    assert [cri.state(c) for c in containers[1:]] == [RUNNING, RUNNING]
    assert cri.pod_status(pod).status.state == cri_state_ready()
    assert len(containerd.shim_pids()) == 1
    after = cri.run_container(pod, workload.image, workload.say("later", "", 0))
    assert cri.wait_exited(after).exit_code == 0
    assert log_has(cri, pod, after, ("stdout", "F", "later"))


def test_exec_sync_output_exit_code_and_timeout(
    cri: CriClient, handler: str, workload: Workload
) -> None:
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, workload.image, workload.sleep)
    result = cri.exec_sync(container, workload.say("exec-out", "exec-err", 4))
    assert (result.stdout, result.stderr, result.exit_code) == (b"exec-out\n", b"exec-err\n", 4)
    started = time.monotonic()
    error = grpc_error(lambda: cri.exec_sync(container, workload.sleep, timeout=1))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert time.monotonic() - started < 60, "the timed-out exec was not ended"
    # The container outlives its timed-out exec.
    assert cri.exec_sync(container, workload.say("still", "", 0)).stdout == b"still\n"


def test_stop_container_sends_sigterm_then_sigkill_after_the_grace(
    cri: CriClient, linux_handler: str, containerd: PrivateContainerd
) -> None:
    pod = cri.run_pod(linux_handler)
    handles_term = cri.run_container(
        pod, containerd.image, ["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 0.1; done"]
    )
    ignores_term = cri.run_container(
        pod, containerd.image, ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
    )
    cri.stop_container(handles_term, grace=30)
    assert cri.wait_exited(handles_term, timeout=5).exit_code == 7
    started = time.monotonic()
    cri.stop_container(ignores_term, grace=2)
    status = cri.wait_exited(ignores_term, timeout=5)
    assert time.monotonic() - started >= 2, "killed before its grace period ended"
    assert status.exit_code == 137


def test_stop_container_of_a_module(cri: CriClient, wasm_image: str) -> None:
    pod = cri.run_pod("pywasm")
    container = cri.run_container(pod, wasm_image, ["/sleep.wasm"])
    cri.stop_container(container, grace=10)
    status = cri.wait_exited(container, timeout=5)
    assert status.exit_code in (128 + 15, 128 + 9)


# Not pyrunsc: gVisor enforces no per-container memory limit (a sub-container has no host
# cgroup, only the sandbox has one, and the sentry's memory.limit_in_bytes is a stub), so the
# container would grow until the host ran out of memory (README, Use with Kubernetes).
# pywasm's OOM test is in test_wasm_pods.py.
@pytest.mark.cgroup
@pytest.mark.parametrize("oom_handler", ["pyrunc", "runc"])
def test_memory_limit_gives_oomkilled(
    cri: CriClient, oom_handler: str, containerd: PrivateContainerd
) -> None:
    pod = cri.run_pod(oom_handler)
    # tail keeps the last line of /dev/zero, which never ends: it grows until killed.
    container = cri.run_container(
        pod, containerd.image, ["tail", "/dev/zero"], memory_limit=32 * MiB
    )
    status = cri.wait_exited(container, timeout=60)
    assert (status.exit_code, status.reason) == (137, "OOMKilled")


@pytest.mark.cgroup
def test_container_stats(cri: CriClient, handler: str, workload: Workload) -> None:
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, workload.image, workload.sleep)

    def has_usage() -> bool:
        stats = cri.stats(container).stats
        return stats.memory.working_set_bytes.value > 0 and stats.cpu.timestamp > 0

    assert wait_until(has_usage, timeout=30, interval=0.5)
    stats = cri.stats(container).stats
    assert stats.attributes.id == container
    listed = {s.attributes.id: s for s in cri.list_stats(pod)}
    assert container in listed
    assert listed[container].memory.working_set_bytes.value > 0


@pytest.mark.cgroup
def test_update_container_resources(
    containerd: PrivateContainerd, cri: CriClient, handler: str, workload: Workload
) -> None:
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, workload.image, workload.sleep)
    if handler == "pyrunsc" and not runsc_has_update():
        error = grpc_error(lambda: cri.update_resources(container, memory_limit_in_bytes=96 * MiB))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error
        assert "runsc has no `update` command" in str(error.details())
        assert cri.state(container) == RUNNING
        return
    cri.update_resources(container, memory_limit_in_bytes=96 * MiB, cpu_shares=512)
    if handler in ("pyrunc", "runc", "pywasm"):  # their cgroup is the container's own
        assert container_memory_limit(containerd, container) == 96 * MiB
        assert container_cpu(containerd, container) == cpu_of_shares(512)
    assert cri.state(container) == RUNNING


def runsc_has_update() -> bool:
    """Whether runsc has `update` (gVisor from 2026 on; the shim then passes updates on)."""
    usage = subprocess.run(["runsc", "help"], capture_output=True, text=True, check=False)
    return "\tupdate " in usage.stdout + usage.stderr


def cgroup_file(containerd: PrivateContainerd, container_id: str, v1: str, v2: str) -> Path:
    root = Path("/sys/fs/cgroup")
    relative = Path(containerd.cgroup_parent) / container_id
    if (root / "cgroup.controllers").is_file():
        return root / relative / v2
    controller, _, name = v1.partition("/")
    return root / controller / relative / name


def container_memory_limit(containerd: PrivateContainerd, container_id: str) -> int:
    path = cgroup_file(containerd, container_id, "memory/memory.limit_in_bytes", "memory.max")
    return int(path.read_text())


def container_cpu(containerd: PrivateContainerd, container_id: str) -> tuple[str, int]:
    """("cpu.shares", value) on cgroup v1, ("cpu.weight", value) on v2."""
    path = cgroup_file(containerd, container_id, "cpu/cpu.shares", "cpu.weight")
    return path.name, int(path.read_text())


def cpu_of_shares(shares: int) -> tuple[str, int]:
    """What container_cpu reads after an update to `shares`: v2 has runc's weight for them
    (not invertible: 512 shares are weight 20, which maps back to 500)."""
    if (Path("/sys/fs/cgroup") / "cgroup.controllers").is_file():
        return "cpu.weight", cpu_weight(shares)
    return "cpu.shares", shares


def test_reopen_container_log(cri: CriClient, handler: str, workload: Workload) -> None:
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, workload.image, workload.tick)
    log_path = Path(cri.container_status(container).status.log_path)
    assert wait_until(lambda: "tick2" in log_path.read_text(), timeout=20)
    rotated = log_path.with_name(log_path.name + ".1")
    log_path.rename(rotated)  # as the kubelet's log rotation does
    cri.reopen_log(container)
    assert wait_until(lambda: log_path.is_file() and "tick" in log_path.read_text(), timeout=20)
    last_rotated = int(rotated.read_text().split("tick")[-1].split()[0])
    first_new = int(log_path.read_text().split("tick")[1].split()[0])
    assert first_new > last_rotated, "the new file continues where the old one stopped"


def test_tty_output_reaches_the_log(
    cri: CriClient, linux_handler: str, containerd: PrivateContainerd
) -> None:
    pod = cri.run_pod(linux_handler)
    container = cri.run_container(
        pod, containerd.image, ["sh", "-c", "echo on-a-tty; [ -t 1 ] && echo is-a-tty"], tty=True
    )
    assert cri.wait_exited(container).exit_code == 0

    def messages() -> Sequence[str]:
        return [
            m.rstrip("\r") for stream, _, m in cri.log_lines(pod, container) if stream == "stdout"
        ]

    assert wait_until(lambda: "is-a-tty" in messages(), timeout=10), messages()
    assert "on-a-tty" in messages()


def test_containerd_restart_keeps_pods_running(
    containerd: PrivateContainerd, cri: CriClient, handler: str, workload: Workload
) -> None:
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, workload.image, workload.sleep)
    shims = containerd.shim_pids()
    containerd.restart()
    cri.wait_ready()
    assert containerd.shim_pids() == shims, "the pod's shim outlives containerd"
    assert wait_until(lambda: cri.state(container) == RUNNING, timeout=30)
    assert cri.pod_status(pod).status.state == cri_state_ready()
    assert (
        cri.exec_sync(container, workload.say("after-restart", "", 0)).stdout == b"after-restart\n"
    )
    exited = cri.run_container(pod, workload.image, workload.say("new", "", 5))
    assert cri.wait_exited(exited).exit_code == 5
    cri.stop_container(container, grace=1)
    assert cri.wait_exited(container, timeout=10).exit_code != 0


def test_unknown_handler_is_refused(cri: CriClient) -> None:
    error = grpc_error(lambda: cri.run_pod("no-such-handler"))
    assert "no-such-handler" in str(error.details())
    assert not cri.list_pods()


def test_removing_a_pod_with_running_containers(
    containerd: PrivateContainerd, cri: CriClient, handler: str, workload: Workload
) -> None:
    pod = cri.run_pod(handler)
    containers = [cri.run_container(pod, workload.image, workload.sleep) for _ in range(2)]
    assert all(cri.state(c) == RUNNING for c in containers)
    cri.remove_pod(pod)  # no StopPodSandbox first: the runtime stops what still runs
    assert not cri.list_pods()
    for container in containers:
        assert grpc_error(lambda c=container: cri.container_status(c)).code() == (
            grpc.StatusCode.NOT_FOUND
        )
    assert wait_until(lambda: not containerd.shim_pids(), timeout=20)
