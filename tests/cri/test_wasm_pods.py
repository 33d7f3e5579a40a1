"""Wasm pods (`pywasm` handler): the pause container runs as a Linux container through runc,
the app containers' WASI modules run on wasmtime in their own cgroups under the pod's cgroup
parent, and one shim serves them all; what the kubelet does that needs a wasm program of its
own (OOMKilled). The behaviours every handler shares are in test_pods.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import grpc
import pytest
from cri_client import CriClient, Pod
from harness import PrivateContainerd, process_comm, wait_until

MiB = 1024 * 1024
RUNC_ROOT = Path("/run/containerd/runc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUNNER_NAME = "pyshim-wasm"  # shim.wasm.runner.PROCESS_NAME

pytestmark = pytest.mark.timeout(180)


def pod_pid(cri: CriClient, pod: Pod) -> int:
    return int(json.loads(cri.pod_status(pod, verbose=True).info["info"])["pid"])


def container_pid(cri: CriClient, container_id: str) -> int:
    return int(json.loads(cri.container_status(container_id).info["info"])["pid"])


def parent_pid(pid: int) -> int:
    stat = (Path("/proc") / str(pid) / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def cgroup_dirs(containerd: PrivateContainerd, container_id: str) -> list[Path]:
    """The container's cgroup directories that exist (v1: one per controller)."""
    relative = Path(containerd.cgroup_parent) / container_id
    candidates = [CGROUP_ROOT / relative] + [p / relative for p in CGROUP_ROOT.iterdir()]
    return [path for path in candidates if path.is_dir()]


def in_cgroup(pid: int, containerd: PrivateContainerd, container_id: str) -> bool:
    """Whether every hierarchy puts the process in the container's cgroup under the pod's
    cgroup parent."""
    expected = f"/{containerd.cgroup_parent}/{container_id}"
    lines = (Path("/proc") / str(pid) / "cgroup").read_text().splitlines()
    paths = [line.split(":", 2)[2] for line in lines if ":name=" not in line]
    return bool(paths) and all(path == expected for path in paths if path != "/")


def runc_state(containerd: PrivateContainerd, container_id: str) -> Path:
    return RUNC_ROOT / containerd.namespace / container_id


def alive(pid: int) -> bool:
    return (Path("/proc") / str(pid)).exists() and process_comm(pid) != ""


def test_the_pause_runs_on_runc_and_the_app_module_in_its_cgroup(
    containerd: PrivateContainerd, cri: CriClient, wasm_image: str
) -> None:
    pod = cri.run_pod("pywasm")
    pause = pod_pid(cri, pod)
    # runc start returns once runc init is told to go, maybe before it has exec'd the pause.
    assert wait_until(lambda: process_comm(pause) == "pause", timeout=10), process_comm(pause)
    assert runc_state(containerd, pod.id).is_dir(), "runc holds the pause container"

    app = cri.run_container(pod, wasm_image, ["/sleep.wasm"])
    runner = container_pid(cri, app)
    assert process_comm(runner) == RUNNER_NAME
    assert in_cgroup(runner, containerd, app)
    assert not runc_state(containerd, app).exists(), "a module is not a runc container"
    # One shim serves both: the pause (re-parented to the subreaping shim) and the runner.
    (shim,) = containerd.shim_pids()
    assert parent_pid(pause) == parent_pid(runner) == shim

    said = cri.run_container(pod, wasm_image, ["/say.wasm", "from-a-module", "", "0"])
    assert cri.wait_exited(said).exit_code == 0
    assert ("stdout", "F", "from-a-module") in cri.log_lines(pod, said)


def test_an_app_container_that_is_not_a_module_fails_clearly_and_leaves_nothing(
    containerd: PrivateContainerd, cri: CriClient, wasm_image: str
) -> None:
    pod = cri.run_pod("pywasm")
    container = cri.create_container(pod, containerd.image, ["sh", "-c", "echo linux"])
    with pytest.raises(grpc.RpcError) as failed:
        cri.start_container(container)
    assert "is not a WebAssembly module" in str(failed.value.details())

    assert container not in containerd.tasks()
    assert not containerd.bundle(container).exists()
    assert not cgroup_dirs(containerd, container)
    assert not runc_state(containerd, container).exists()
    assert len(containerd.shim_pids()) == 1, "the pod's shim serves on"
    assert cri.pod_status(pod).status.state == 0  # SANDBOX_READY
    cri.remove_container(container)
    module = cri.run_container(pod, wasm_image, ["/say.wasm", "still-fine", "", "0"])
    assert cri.wait_exited(module).exit_code == 0


def test_a_module_over_its_memory_limit_is_oomkilled(
    containerd: PrivateContainerd, cri: CriClient, wasm_image: str
) -> None:
    pod = cri.run_pod("pywasm")
    container = cri.run_container(pod, wasm_image, ["/oom.wasm"], memory_limit=32 * MiB)
    status = cri.wait_exited(container, timeout=60)
    assert (status.exit_code, status.reason) == (137, "OOMKilled"), status.message


def test_delete_after_a_shim_crash_cleans_up_the_pause_and_the_modules(
    containerd: PrivateContainerd, cri: CriClient, wasm_image: str
) -> None:
    pod = cri.run_pod("pywasm")
    app = cri.run_container(pod, wasm_image, ["/sleep.wasm"])
    pause, runner = pod_pid(cri, pod), container_pid(cri, app)
    (shim,) = containerd.shim_pids()

    os.kill(shim, signal.SIGKILL)  # containerd then runs `<shim> delete` per task

    assert wait_until(lambda: not runc_state(containerd, pod.id).exists(), timeout=30)
    assert wait_until(lambda: not cgroup_dirs(containerd, app), timeout=30)
    assert wait_until(lambda: not alive(pause) and not alive(runner), timeout=10)
    assert wait_until(lambda: cri.state(app) == 2, timeout=30)  # CONTAINER_EXITED
