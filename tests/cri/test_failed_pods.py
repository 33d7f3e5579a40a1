"""Pods whose sandbox failed, per handler, with containerd's `runc` as the reference:
RunPodSandbox fails, and the kubelet can still stop and remove the pod, which leaves no shim,
sandbox process, runsc state, mount or network behind (the autouse `clean_pods` checks the
rest), also once the pod's shim has had no container for longer than it waits before exiting.

The failures: a sysctl that does not exist (runc fails the pause's create, in pykata's VM
too; runsc ignores sysctls), and for pyrunsc a runsc flag runsc refuses at create, a `runsc
start` that fails, and gVisor's netstack refusing the pod's netns where this runsc misjudges
it (issue 10704).
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as api
from cri_client import NODE, POD, CriClient
from harness import PrivateContainerd, wait_until
from runsc_netns import netstack_refused_here
from runsc_support import require_runsc
from vm_support import require_vm

from shim.daemon import ABANDONED_AFTER
from shim.install.dropin import RUNSC_TOML

pytestmark = pytest.mark.timeout(300)

RUNC_HANDLERS = ["pyrunc", "pywasm", "runc"]  # the pause runs under runc in each
NO_SUCH_SYSCTL = {"net.ipv4.pyshim_no_such_sysctl": "1"}


def run_failing_pod(
    cri: CriClient, handler: str, network: int = NODE, sysctls: dict[str, str] | None = None
) -> str:
    """RunPodSandbox of a pod that must fail; the error's text. What containerd kept of the
    pod is left to the kubelet's cleanup, as the kubelet finds it in ListPodSandbox."""
    uid = uuid.uuid4().hex
    log_directory = cri.log_root / uid
    log_directory.mkdir(parents=True)
    config = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=f"failing-{uid[:8]}", uid=uid, namespace="default"),
        log_directory=str(log_directory),
        linux=api.LinuxPodSandboxConfig(
            cgroup_parent=cri.cgroup_parent,
            sysctls=sysctls or {},
            security_context=api.LinuxSandboxSecurityContext(
                namespace_options=api.NamespaceOption(
                    network=network, pid=api.NamespaceMode.CONTAINER, ipc=network
                )
            ),
        ),
    )
    request = api.RunPodSandboxRequest(config=config, runtime_handler=handler)
    with pytest.raises(grpc.RpcError) as failed:
        cri.call("RunPodSandbox", request)
    cri.created.update(p.id for p in cri.list_pods() if p.metadata.uid == uid)
    return str(failed.value.details())  # type: ignore[attr-defined]


def remove_every_pod(containerd: PrivateContainerd, cri: CriClient) -> None:
    """The kubelet's cleanup of the failed pods: each one stopped and removed, without error,
    and then no process left in the test's pod cgroups."""
    for pod in cri.list_pods():
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)
    assert not cri.list_pods()
    assert wait_until(lambda: not containerd.shim_pids(), timeout=30), containerd.shim_pids()
    assert wait_until(lambda: not pod_processes(cri), timeout=10), pod_processes(cri)


def pod_processes(cri: CriClient) -> list[int]:
    """The processes in the pods' cgroups (under the test's cgroup parent)."""
    pids: list[int] = []
    for hierarchy in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        parent = hierarchy / cri.cgroup_parent.strip("/")
        if parent.is_dir():
            for procs in parent.rglob("cgroup.procs"):
                pids += [int(line) for line in procs.read_text().split()]
            return pids
    return pids


@pytest.fixture
def runsc_config(containerd: PrivateContainerd) -> Iterator[Callable[[str], None]]:
    """Sets the text of the pyrunsc handler's runsc.toml for the test (the shim reads it at
    each Create); the session's is restored after it."""
    require_runsc()
    path = containerd.base / "runsc.toml"
    saved = path.read_text()
    try:
        yield path.write_text
    finally:
        path.write_text(saved)


@pytest.mark.parametrize("handler", [*RUNC_HANDLERS, "pykata"])
def test_a_pod_whose_pause_create_failed_is_removed(
    containerd: PrivateContainerd, cri: CriClient, handler: str
) -> None:
    if handler == "pykata":  # the pause's create fails in the VM, under the guest's runc
        require_vm()
    error = run_failing_pod(cri, handler, network=POD, sysctls=NO_SUCH_SYSCTL)
    assert "pyshim_no_such_sysctl" in error
    remove_every_pod(containerd, cri)


def test_a_pyrunsc_pod_whose_sandbox_create_failed_is_removed(
    containerd: PrivateContainerd, cri: CriClient, runsc_config: Callable[[str], None]
) -> None:
    runsc_config('[runsc_config]\nplatform = "pyshim-no-such-platform"\n')
    assert "pyshim-no-such-platform" in run_failing_pod(cri, "pyrunsc")
    remove_every_pod(containerd, cri)


def test_a_pyrunsc_pod_whose_sandbox_start_failed_is_removed(
    containerd: PrivateContainerd, cri: CriClient, runsc_config: Callable[[str], None]
) -> None:
    """The sandbox is created, then `runsc start` fails: runsc cannot signal a container in
    state created, yet StopPodSandbox kills it."""
    runsc = shutil.which("runsc")
    assert runsc is not None
    wrapper = containerd.base / "runsc-failing-start"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for arg; do [ "$arg" = start ] && { echo "pyshim test: start refused" >&2; exit 1; }; '
        "done\n"
        f'exec {shlex.quote(runsc)} "$@"\n'
    )
    os.chmod(wrapper, 0o755)
    runsc_config(f'binary_name = "{wrapper}"\n[runsc_config]\n')
    assert "start refused" in run_failing_pod(cri, "pyrunsc")
    remove_every_pod(containerd, cri)


def test_pyrunsc_pods_on_a_cni_network_fail_clearly_by_default_where_runsc_misjudges_the_netns(
    containerd: PrivateContainerd, cri: CriClient, runsc_config: Callable[[str], None]
) -> None:
    """With the runsc.toml `pyshim install` writes: where this runsc would refuse the pod's
    netns (the session's config then chose network_fallback), the error says why and what to
    set; the pod is removed as any failed one."""
    if not netstack_refused_here():
        pytest.skip("this runsc and kernel run gVisor's netstack in a pod's netns")
    runsc_config(RUNSC_TOML)
    error = run_failing_pod(cri, "pyrunsc", network=POD)
    for text in ("10704", "rmem_default", "network_fallback", str(containerd.base / "runsc.toml")):
        assert text in error, error
    remove_every_pod(containerd, cri)


def test_failed_pods_stay_removable_after_their_shims_idle_time(
    containerd: PrivateContainerd, cri: CriClient, runsc_config: Callable[[str], None]
) -> None:
    """A shim left with no container exits by itself after ABANDONED_AFTER; containerd must
    not be left holding a task of a failed pod that only that shim could delete."""
    runsc_config('[runsc_config]\nplatform = "pyshim-no-such-platform"\n')
    run_failing_pod(cri, "pyrunsc", network=POD)
    for handler in RUNC_HANDLERS:
        run_failing_pod(cri, handler, network=POD, sysctls=NO_SUCH_SYSCTL)
    time.sleep(ABANDONED_AFTER + 5)
    remove_every_pod(containerd, cri)
