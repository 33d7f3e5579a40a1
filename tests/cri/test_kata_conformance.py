"""pykata against containerd's runc shim (`runc`, the reference) where critest found them apart
(issue 24): the mounts below a read-only volume stay writable, the host removes a volume's
directory while the pod runs, and a privileged container can use kernel features that live in
modules (bridge, veth, tun, overlay), loaded on demand in the VM as on a host. One pod per
check: each pykata pod boots a VM."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cri_api.v1 import api_pb2 as api
from cri_client import CALL_TIMEOUT, POD, CriClient, Pod
from harness import PrivateContainerd, detach_mounts, mounts_under
from vm_support import require_vm

from shim.kata.state import VmPaths

pytestmark = pytest.mark.timeout(400)

SLEEP = ["sleep", "100000"]


@pytest.fixture(params=["pykata", "runc"])
def handler(request: pytest.FixtureRequest) -> str:
    if request.param == "pykata":
        require_vm()
    return str(request.param)


def create_with_mounts(
    cri: CriClient,
    monkeypatch: pytest.MonkeyPatch,
    pod: Pod,
    image: str,
    mounts: Sequence[api.Mount],
) -> str:
    """A sleeping container with these volumes (the kubelet's other settings as the client's)."""
    call = cri.call

    def with_mounts(method: str, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        if method == "CreateContainer":
            request.config.mounts.extend(mounts)
        return call(method, request, timeout)

    with monkeypatch.context() as patched:
        patched.setattr(cri, "call", with_mounts)
        container_id = cri.create_container(pod, image, SLEEP)
    cri.start_container(container_id)
    return container_id


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a tmpfs mounted at its `tmpfs` (critest's non-recursive read-only
    case) and an empty `inner` directory (where another volume goes)."""
    (tmp_path / "volume" / "tmpfs").mkdir(parents=True)
    (tmp_path / "volume" / "inner").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", tmp_path / "volume" / "tmpfs"], check=True)
    try:
        yield tmp_path / "volume"
    finally:
        subprocess.run(["umount", "-l", tmp_path / "volume" / "tmpfs"], check=True)


def writable(cri: CriClient, container_id: str, directory: str) -> bool:
    result = cri.exec_sync(container_id, ["touch", f"{directory}/written"])
    assert result.exit_code == 0 or b"Read-only file system" in result.stderr, result.stderr
    return bool(result.exit_code == 0)


def test_a_read_only_volume_is_read_only_only_at_its_own_mount(
    cri: CriClient,
    containerd: PrivateContainerd,
    handler: str,
    volume: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    mounts = [
        api.Mount(container_path="/vol", host_path=str(volume), readonly=True),
        api.Mount(container_path="/vol/inner", host_path=str(other)),
    ]
    try:
        pod = cri.run_pod(handler)
        container_id = create_with_mounts(cri, monkeypatch, pod, containerd.image, mounts)
        assert not writable(cri, container_id, "/vol")
        # The host's tmpfs below the volume keeps its own (read-write) state, as with runc's
        # bind + remount of the volume's top mount only; so does the volume mounted inside.
        assert writable(cri, container_id, "/vol/tmpfs")
        assert writable(cri, container_id, "/vol/inner")
        assert (volume / "tmpfs" / "written").exists()
        assert (other / "written").exists()
        assert not (volume / "written").exists()
    finally:
        cri.remove_all()  # before the fixture unmounts the host's tmpfs


def test_the_host_removes_a_volume_directory_while_the_pod_runs(
    cri: CriClient,
    containerd: PrivateContainerd,
    handler: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """critest's non-recursive read-only case to its end: the directory and its tmpfs made once
    the pod runs, then, the pod still running, the tmpfs detached and the directory removed.
    rmdir of a mount point is EBUSY in the mount namespace that has the mount (elsewhere the
    kernel detaches it): pykata's shim binds the volume and the tmpfs below it into the VM's
    shared directory in a mount namespace of its own, never in the host's."""
    pod = cri.run_pod(handler)
    volume = tmp_path / "volume"
    (volume / "tmpfs").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", volume / "tmpfs"], check=True)
    try:
        mounts = [api.Mount(container_path="/mnt", host_path=str(volume), readonly=True)]
        container_id = create_with_mounts(cri, monkeypatch, pod, containerd.image, mounts)
        assert writable(cri, container_id, "/mnt/tmpfs")
        # The host's tmpfs, mounted after the shim started, whatever the host's propagation.
        assert (volume / "tmpfs" / "written").exists()
    finally:
        detach_mounts([volume / "tmpfs"])  # as critest: umount2(MNT_DETACH)
    shutil.rmtree(volume)
    [shim] = containerd.shim_pids()
    vm = VmPaths.for_group(containerd.namespace, pod.id)
    if handler == "pykata":  # the shared directory's mounts are the shim's own
        assert mounts_under(vm.container_dir(container_id), shim)
        assert not mounts_under(vm.root)
    assert cri.exec_sync(container_id, ["true"]).exit_code == 0  # the pod still runs
    cri.stop_container(container_id, grace=0)
    cri.remove_container(container_id)
    # The container's rootfs and shares are gone from the shim's mount namespace, which lives
    # on with the pod (the fixture checks the host's once the pods are gone).
    assert not mounts_under(containerd.bundle(container_id), shim)
    assert not mounts_under(vm.container_dir(container_id), shim)


def test_a_privileged_container_gets_kernel_modules_on_demand(
    cri: CriClient, containerd: PrivateContainerd, handler: str
) -> None:
    # On a pod network for both: runc's privileged container must not touch the node's.
    pod = cri.run_pod(handler, network=POD, privileged=True)
    container_id = cri.run_container(pod, containerd.image, SLEEP, privileged=True)
    script = (
        "brctl addbr br-test && ip link add vtest0 type veth peer name vtest1"
        " && ip link add brtest2 type bridge && tunctl -t taptest"
        " && mkdir /ovl && mount -t tmpfs tmpfs /ovl && mkdir /ovl/l /ovl/u /ovl/w /ovl/o"
        " && mount -t overlay -o lowerdir=/ovl/l,upperdir=/ovl/u,workdir=/ovl/w overlay /ovl/o"
        " && ip -o link && grep overlay /proc/mounts"
    )
    result = cri.exec_sync(container_id, ["sh", "-c", script], timeout=120)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    out = result.stdout.decode()
    for name in ("br-test", "vtest0", "brtest2", "taptest", "overlay /ovl/o"):
        assert name in out, out
