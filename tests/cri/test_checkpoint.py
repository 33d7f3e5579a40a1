"""Checkpoint and restore through CRI, per handler, as Kubernetes does them.

`CheckpointContainer` (Kubernetes' forensic container checkpointing) writes an archive of a
running container, which keeps running; a container created from that archive (its path as
the image) in another pod restores it. containerd 2.x implements both (CRImportCheckpoint);
1.6 and 1.7 answer Unimplemented. The restore pulls the checkpoint's base image by the digest
recorded in the archive, so the pods' image comes from a registry on loopback (registry.py),
pulled through CRI as a kubelet pulls.

pyrunc and containerd's own runc shim need CRIU (marker `criu`: scripts/vm-test's checkpoint
suite). runsc checkpoints whole sandboxes, so pyrunsc refuses a pod's container. pykata runs
CRIU in its guest's kernel, so its tests run on this host (the guest on runc: Debian's crun has
no CRIU, and a pod on crun is refused).
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from counter_workload import COUNT_FILE, COUNTER, parse_count
from cri_client import CriClient, Pod
from harness import IMAGE_TAR, PrivateContainerd, wait_until
from registry import serving
from runsc_support import criu_unusable_reason, require_runsc
from vm_support import require_vm

pytestmark = [pytest.mark.timeout(300), pytest.mark.checkpoint]


@pytest.fixture(scope="module")
def registry_image(containerd: PrivateContainerd, cri: CriClient) -> Iterator[str]:
    """busybox pulled through CRI from a registry on loopback that serves for the whole module:
    CRI keeps the first registry's digest reference for an image id, and a restore pulls the one
    the checkpointed container showed."""
    with serving(IMAGE_TAR, "pyshim/busybox", "checkpoint", containerd.registry_hosts) as ref:
        cri.pull_image(ref)
        try:
            yield ref
        finally:
            # Its names only (the tag, CRI's digest reference): CRI's RemoveImage would remove
            # the session's busybox too (the same id).
            host = ref.split("/", 1)[0] + "/"
            names = containerd.ctr("images", "ls", "-q").stdout.split()
            ours = [name for name in names if name.startswith(host)]
            if ours:
                containerd.ctr("images", "rm", *ours)


def shown(cri: CriClient, container_id: str) -> tuple[str, int]:
    """The token and the count the counter last wrote."""
    return parse_count(cri.exec_sync(container_id, ["cat", COUNT_FILE]).stdout.decode())


def count(cri: CriClient, container_id: str) -> int:
    return shown(cri, container_id)[1]


def assert_unimplemented_before_2(containerd: PrivateContainerd, cri: CriClient) -> bool:
    """On containerd 1.x, that CheckpointContainer is Unimplemented (True: nothing else to
    test); False on 2.x."""
    if not containerd.version.startswith("1."):
        return False
    with pytest.raises(grpc.RpcError) as error:
        cri.checkpoint("any", containerd.base / "never-written.tar")
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not (containerd.base / "never-written.tar").exists()
    return True


@pytest.mark.criu
@pytest.mark.parametrize("criu_handler", ["pyrunc", "runc"])
def test_checkpoint_archive_restores_in_another_pod(
    containerd: PrivateContainerd,
    cri: CriClient,
    criu_handler: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if assert_unimplemented_before_2(containerd, cri):
        return
    reason = criu_unusable_reason()
    if reason:
        pytest.skip(reason)
    image = request.getfixturevalue("registry_image")
    pods = cri.run_pod(criu_handler), cri.run_pod(criu_handler)
    restore_in_another_pod(cri, *pods, image, tmp_path / "checkpoint.tar")


def restore_in_another_pod(
    cri: CriClient, source_pod: Pod, target_pod: Pod, image: str, archive: Path
) -> str:
    """The counter run in source_pod, checkpointed, and restored in target_pod: the restored
    container's id."""
    source = cri.run_container(source_pod, image, COUNTER)
    assert wait_until(lambda: count(cri, source) >= 20, timeout=60)
    token, before = shown(cri, source)
    began = time.monotonic()
    cri.checkpoint(source, archive)
    checkpointed_in = time.monotonic() - began
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"spec.dump", "config.dump", "rootfs-diff.tar"} <= names
    assert any(name.startswith("checkpoint/") for name in names), names  # CRIU's images
    # Forensic checkpointing leaves the container running.
    left = count(cri, source)
    assert wait_until(lambda: count(cri, source) > left, timeout=20)

    began = time.monotonic()
    restored = cri.create_container(target_pod, str(archive), [])
    created_in = time.monotonic() - began
    cri.start_container(restored)
    restored_in = time.monotonic() - began - created_in
    assert cri.container_status(restored).status.state == 1  # CONTAINER_RUNNING
    # Once the process writes again: the same process, its count going on.
    stale = shown(cri, restored)
    assert wait_until(lambda: shown(cri, restored) != stale, timeout=20)
    restored_token, after = shown(cri, restored)
    assert restored_token == token
    assert after > before
    # The source, in its own pod, counts on beside it.
    assert cri.state(source) == 1
    left = count(cri, source)
    assert wait_until(lambda: count(cri, source) > left, timeout=20)
    print(
        f"{source_pod.handler}: CheckpointContainer {checkpointed_in:.1f} s; from the archive"
        f" CreateContainer {created_in:.1f} s, StartContainer (the restore) {restored_in:.1f} s"
    )
    return restored


def test_pyrunsc_refuses_to_checkpoint_a_pod_container(
    containerd: PrivateContainerd, cri: CriClient, tmp_path: Path
) -> None:
    """runsc would checkpoint, and stop, the whole sandbox: the pod keeps running instead."""
    require_runsc()
    if assert_unimplemented_before_2(containerd, cri):
        return
    error = refused_checkpoint(cri, "pyrunsc", containerd.image, tmp_path / "checkpoint.tar")
    assert "runsc checkpoints and restores whole sandboxes" in str(error.details())


def refused_checkpoint(cri: CriClient, handler: str, image: str, archive: Path) -> grpc.RpcError:
    """CheckpointContainer of a counter in a new pod of `handler`, refused: its error, once
    no archive is written and the pod and its counter run on."""
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, image, COUNTER)
    assert wait_until(lambda: count(cri, container) >= 5, timeout=60)
    with pytest.raises(grpc.RpcError) as error:
        cri.checkpoint(container, archive)
    assert not archive.exists()
    assert cri.pod_status(pod).status.state == 0  # SANDBOX_READY
    seen = count(cri, container)
    assert wait_until(lambda: count(cri, container) > seen, timeout=20)
    return error.value


@pytest.fixture
def pykata_guest_on_runc(containerd: PrivateContainerd) -> Iterator[None]:
    """The pykata handler's config with its guest on runc while the test runs: the shim reads
    the config as it boots each pod's VM."""
    require_vm()
    config = containerd.pykata_config
    default = config.read_text()
    config.write_text(default + 'guest_runtime = "runc"\n')
    try:
        yield
    finally:
        config.write_text(default)


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("pykata_guest_on_runc")
def test_pykata_checkpoint_archive_restores_in_another_pod(
    containerd: PrivateContainerd, cri: CriClient, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """CRIU in the source pod's guest writes the image; the restored container joins the
    target pod's namespaces in its guest, as runc's restore does on a host: the network
    namespace (the guest's root, the VM's NIC) as CRIU's external one, IPC and UTS by CRIU's
    join-ns. The hostname stays the target pod's: the image leaves the pod's UTS namespace out
    (shim.runtimes.runc's checkpoint runs CRIU inside it)."""
    if assert_unimplemented_before_2(containerd, cri):
        return
    image = request.getfixturevalue("registry_image")
    source_pod = cri.run_pod("pykata", hostname="checkpointed")
    target_pod = cri.run_pod("pykata", hostname="restored")
    restored = restore_in_another_pod(cri, source_pod, target_pod, image, tmp_path / "ck.tar")
    sibling = cri.run_container(target_pod, image, ["sleep", "3600"])
    assert pod_namespaces(cri, restored) == pod_namespaces(cri, sibling)
    for container_id in (restored, sibling):
        assert cri.exec_sync(container_id, ["hostname"]).stdout.decode().strip() == "restored"
    addresses = cri.exec_sync(restored, ["cat", "/proc/net/fib_trie"]).stdout.decode()
    assert cri.pod_ip(target_pod) in addresses


def pod_namespaces(cri: CriClient, container_id: str) -> list[str]:
    """The container's namespaces of the kinds a pod's containers share."""
    links = [f"/proc/self/ns/{kind}" for kind in ("uts", "ipc", "net")]
    script = 'for link in "$@"; do readlink "$link"; done'  # busybox's reads one link
    return cri.exec_sync(container_id, ["sh", "-c", script, "sh", *links]).stdout.decode().split()


def test_pykata_on_crun_refuses_to_checkpoint(
    containerd: PrivateContainerd, cri: CriClient, tmp_path: Path
) -> None:
    """The default guest runtime, crun, is built without CRIU in Debian: FailedPrecondition
    saying which runtime can, no archive, and the pod runs on."""
    require_vm()
    if assert_unimplemented_before_2(containerd, cri):
        return
    error = refused_checkpoint(cri, "pykata", containerd.image, tmp_path / "checkpoint.tar")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    assert 'guest_runtime = "runc"' in str(error.details())
