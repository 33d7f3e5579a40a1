"""gVisor pods under CRI (`pyrunsc`): the pod is one sandbox, its app containers are
sub-containers of it, served by one shim; their exits, a sandbox that dies, and the cleanup."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as api
from cri_client import NODE, CriClient, Pod
from harness import PrivateContainerd, wait_until
from runsc_support import RUNSC_ROOT, require_runsc

SLEEP = ["sleep", "100000"]
# The sandbox kernel's identity: its boot id where gVisor has one, else its boot log, which
# gVisor makes up (random lines and times) at every boot.
KERNEL_IDENTITY = ["sh", "-c", "cat /proc/sys/kernel/random/boot_id 2>/dev/null || dmesg"]


@pytest.fixture(autouse=True)
def runsc() -> None:
    require_runsc()


@pytest.fixture
def image(containerd: PrivateContainerd) -> str:
    return containerd.image


def kernel_identity(cri: CriClient, container_id: str) -> bytes:
    result = cri.exec_sync(container_id, KERNEL_IDENTITY)
    assert result.exit_code == 0 and result.stdout, result
    return bytes(result.stdout)


def verbose_pid(info: dict[str, str]) -> int:
    """The pid containerd holds for a pod or container (CRI's verbose info)."""
    return int(json.loads(info["info"])["pid"])


def sandbox_pid(cri: CriClient, pod: Pod) -> int:
    return verbose_pid(dict(cri.pod_status(pod, verbose=True).info))


def test_containers_of_a_pod_share_one_gvisor_kernel(cri: CriClient, image: str) -> None:
    pod = cri.run_pod("pyrunsc")
    first, second = (cri.run_container(pod, image, SLEEP) for _ in range(2))
    other = cri.run_container(cri.run_pod("pyrunsc"), image, SLEEP)

    kernel = kernel_identity(cri, first)
    assert kernel_identity(cri, second) == kernel
    assert kernel_identity(cri, other) != kernel, "another pod has its own sandbox"
    assert kernel != Path("/proc/sys/kernel/random/boot_id").read_bytes(), "not the host's"


def test_one_shim_and_one_sandbox_process_serve_the_pod(
    containerd: PrivateContainerd, cri: CriClient, image: str
) -> None:
    pod = cri.run_pod("pyrunsc")
    containers = [cri.run_container(pod, image, SLEEP) for _ in range(2)]
    assert len(containerd.shim_pids()) == 1
    sandbox = sandbox_pid(cri, pod)
    # A sub-container's pid is its sandbox's, as runsc reports it.
    for container in containers:
        assert verbose_pid(dict(cri.container_status(container).info)) == sandbox


def test_sub_containers_report_their_own_exit_codes(cri: CriClient, image: str) -> None:
    pod = cri.run_pod("pyrunsc")
    running = cri.run_container(pod, image, SLEEP)
    exits = {
        cri.run_container(pod, image, ["sh", "-c", "exit 3"]): 3,
        cri.run_container(pod, image, ["true"]): 0,
        cri.run_container(pod, image, ["sh", "-c", "kill -KILL $$"]): 137,
    }
    for container, code in exits.items():
        assert cri.wait_exited(container).exit_code == code
    # Its siblings' exits end neither the sandbox nor the container still running.
    assert cri.state(running) == api.ContainerState.CONTAINER_RUNNING
    assert cri.pod_status(pod).status.state == api.PodSandboxState.SANDBOX_READY


def test_a_dead_sandbox_ends_its_containers(
    containerd: PrivateContainerd, cri: CriClient, image: str
) -> None:
    pod = cri.run_pod("pyrunsc")
    containers = [cri.run_container(pod, image, SLEEP) for _ in range(2)]
    os.kill(sandbox_pid(cri, pod), signal.SIGKILL)

    for container in containers:
        assert cri.wait_exited(container, timeout=30).exit_code == 128 + signal.SIGKILL
    assert wait_until(
        lambda: cri.pod_status(pod).status.state == api.PodSandboxState.SANDBOX_NOTREADY,
        timeout=30,
    )
    cri.stop_pod(pod)
    cri.remove_pod(pod)
    assert wait_until(lambda: not containerd.shim_pids(), timeout=20)


def test_removing_the_pod_leaves_no_runsc_state_shim_or_mount(
    containerd: PrivateContainerd, cri: CriClient, image: str
) -> None:
    pod = cri.run_pod("pyrunsc")
    containers = [cri.run_container(pod, image, SLEEP) for _ in range(2)]
    cri.stop_container(containers[0], grace=1)
    cri.stop_pod(pod)
    cri.remove_pod(pod)

    def state_files() -> list[Path]:
        root = RUNSC_ROOT / containerd.namespace
        ids = [pod.id, *containers]
        return [p for p in root.iterdir() if any(i in p.name for i in ids)]

    assert wait_until(lambda: not state_files(), timeout=20), state_files()
    assert wait_until(lambda: not containerd.leftovers(), timeout=20), containerd.leftovers()


def test_a_host_network_pod_is_on_the_nodes_network(
    containerd: PrivateContainerd, cri: CriClient, image: str
) -> None:
    """hostNetwork (namespace_options.network = NODE): runsc's network=host, the node's
    interfaces, as a runc pod sees them (not a loopback-only sandbox)."""
    pod = cri.run_pod("pyrunsc", network=NODE)
    container = cri.run_container(pod, image, SLEEP)
    links = cri.exec_sync(container, ["ip", "-o", "link"])
    assert links.exit_code == 0, links
    # The node's own interface, which exists whatever pods ran: its default route's.
    routes = [line.split() for line in Path("/proc/net/route").read_text().splitlines()[1:]]
    uplinks = [fields[0] for fields in routes if fields[1] == "00000000"]
    if not uplinks:
        pytest.skip("the node has no default route to name its interface")
    assert f": {uplinks[0]}:" in links.stdout.decode(), links.stdout
