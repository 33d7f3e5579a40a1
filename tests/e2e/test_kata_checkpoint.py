"""Checkpoint and restore of a pykata container: CRIU runs in the guest (runc's checkpoint and
restore there), the image goes through the VM's shared directory to and from containerd.

CRIU in the guest, not a snapshot of the whole VM: QEMU refuses to migrate a VM whose guest has
a 9p export mounted, and every container's rootfs comes through the pod's 9p share. The guest
kernel (Debian's 6.1) runs CRIU, which this host's kernel cannot: these tests need no `criu`
marker and run in the host's checkpoint pass. The guest runs runc ([vm] guest_runtime): Debian's
crun 1.8.1 is built without CRIU.

The flow is the one ctr restores (PROTOCOL P): `ctr containers checkpoint --task --rw`, the
task and container removed, `ctr containers restore --live --rw`.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from counter_workload import COUNTER, count
from harness import PYKATA_RUNTIME, CtrError, PrivateContainerd, mounts_under, wait_until
from product import pykata_toml
from runsc_support import removing_ctr_fifos
from vm_support import require_vm

from shim.kata.state import BASE_DIR, VmPaths, qemu_pid

pytestmark = [pytest.mark.checkpoint, pytest.mark.timeout(900)]

BOOT = 240  # seconds for a ctr command that boots a VM, on a busy 2-core machine
CRIU = 600  # seconds for a ctr command that runs CRIU in a TCG guest
CHECKPOINT_MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"


@pytest.fixture(scope="module", autouse=True)
def vm_capable() -> None:
    require_vm()


@pytest.fixture
def runc_config(containerd: PrivateContainerd, tmp_path: Path) -> Path:
    """A pykata config whose guest runs runc, the guest runtime that checkpoints."""
    path = tmp_path / "pykata-runc.toml"
    path.write_text(pykata_toml(containerd.vm_assets) + 'guest_runtime = "runc"\n')
    return path


@pytest.fixture
def counter(containerd: PrivateContainerd, runc_config: Path) -> Iterator[str]:
    """A running pykata container that counts in /tmp/n, its VM's guest on runc."""
    name = "kata-counter"
    containerd.ctr(
        "run", "-d", "--runtime", PYKATA_RUNTIME, "--runtime-config-path", str(runc_config),
        containerd.image, name, *COUNTER, timeout=BOOT,
    )  # fmt: skip
    yield name
    containerd.kill_and_delete(name, check=False)


def checkpoint(containerd: PrivateContainerd, name: str, ref: str) -> float:
    """`ctr containers checkpoint --task --rw`, then the task and container removed; seconds
    the checkpoint took."""
    began = time.monotonic()
    try:
        containerd.ctr("containers", "checkpoint", "--task", "--rw", name, ref, timeout=CRIU)
        return time.monotonic() - began
    finally:
        containerd.kill_and_delete(name, check=False)


def assert_no_vm_left(containerd: PrivateContainerd, name: str) -> None:
    """No QEMU, VM directory or mount of the container's VM, no shim (containerd's `delete`
    may still run)."""
    paths = VmPaths.for_group(containerd.namespace, name)
    gone = wait_until(lambda: not qemu_pid(paths) and not paths.root.exists(), timeout=20)
    assert gone, list(paths.root.rglob("*"))
    assert not mounts_under(BASE_DIR / paths.root.name)
    assert wait_until(lambda: not containerd.shim_pids(), timeout=20), containerd.shim_pids()


def test_restored_counter_goes_on_from_where_it_was_twice(
    containerd: PrivateContainerd, counter: str
) -> None:
    """Checkpointed, restored, and the restored container checkpointed and restored again."""
    assert wait_until(lambda: count(containerd, counter) >= 20, timeout=60)
    for round in (1, 2):
        ref = f"localhost/pyshim-checkpoint/kata-counter:{round}"
        before = count(containerd, counter)
        took = checkpoint(containerd, counter, ref)
        assert_no_vm_left(containerd, counter)
        try:
            with removing_ctr_fifos(counter):
                began = time.monotonic()
                containerd.ctr(
                    "containers", "restore", "--live", "--rw", counter, ref, timeout=CRIU
                )
                restored_in = time.monotonic() - began
                assert containerd.task_status(counter) == "RUNNING"
                restored = count(containerd, counter)
                # A counter started afresh would be back near 1.
                assert restored >= before
                assert wait_until(lambda r=restored: count(containerd, counter) > r, timeout=30)
        finally:
            containerd.ctr("images", "rm", ref, check=False)
        print(f"pykata round {round}: checkpoint {took:.1f} s, restore {restored_in:.1f} s")
    containerd.kill_and_delete(counter)
    assert_no_vm_left(containerd, counter)


def test_restore_while_the_original_runs_is_refused_and_leaves_nothing(
    containerd: PrivateContainerd, counter: str
) -> None:
    ref = "localhost/pyshim-checkpoint/kata-running:1"
    qemu = containerd.task_pid(counter)
    try:
        containerd.ctr("containers", "checkpoint", "--task", "--rw", counter, ref, timeout=CRIU)
        with removing_ctr_fifos(counter), pytest.raises(CtrError, match="already exists"):
            containerd.ctr("containers", "restore", "--live", "--rw", counter, ref, timeout=CRIU)
        # The original runs on in its VM, and no second VM was started.
        assert containerd.task_pid(counter) == qemu
        assert containerd.task_status(counter) == "RUNNING"
        assert len(containerd.shim_pids()) == 1
    finally:
        containerd.ctr("images", "rm", ref, check=False)


def test_corrupt_image_fails_the_restore_with_criu_s_error_and_leaves_nothing(
    containerd: PrivateContainerd, counter: str
) -> None:
    ref = "localhost/pyshim-checkpoint/kata-corrupt:1"
    checkpoint(containerd, counter, ref)
    try:
        corrupt_checkpoint_blob(containerd, ref)
        with removing_ctr_fifos(counter):
            result = containerd.ctr(
                "containers", "restore", "--live", "--rw", counter, ref, timeout=CRIU, check=False
            )
            assert result.returncode != 0, result.stdout
            assert "CRIU" in result.stderr, result.stderr
            print(f"corrupt image: {result.stderr.strip()}")
            containerd.ctr("tasks", "delete", "--force", counter, check=False)
            containerd.ctr("containers", "delete", counter, check=False)
        assert_no_vm_left(containerd, counter)
    finally:
        containerd.ctr("images", "rm", ref, check=False)


def test_checkpoint_to_a_path_that_cannot_be_a_directory_says_so(
    containerd: PrivateContainerd, counter: str, tmp_path: Path
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    image = not_a_directory / "image"
    images_before = set(containerd.ctr("images", "ls", "-q").stdout.split())
    result = containerd.ctr(
        "tasks", "checkpoint", "--image-path", str(image), counter, timeout=CRIU, check=False
    )
    if containerd.version.startswith("1."):
        # ctr 1.x sends CheckpointOptions (the image path among them) to runc runtimes only:
        # the shim gets containerd's own directory, and the checkpoint is an image as usual.
        made = set(containerd.ctr("images", "ls", "-q").stdout.split()) - images_before
        if made:
            containerd.ctr("images", "rm", *made)
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert f"checkpoint path {image}" in result.stderr, result.stderr
    assert containerd.task_status(counter) == "RUNNING"  # the client resumes it
    assert count(containerd, counter) > 0
    paths = VmPaths.for_group(containerd.namespace, counter)
    # The shim's mounts are in its own mount namespace, which QEMU's pid shows.
    qemu = containerd.task_pid(counter)
    assert not [p for p in mounts_under(paths.root, qemu) if "checkpoint" in str(p)]


def test_a_guest_on_crun_says_checkpoints_need_runc(containerd: PrivateContainerd) -> None:
    """Debian's crun 1.8.1 is built without CRIU: the error says which runtime to choose."""
    name = "kata-crun"
    containerd.ctr(
        "run", "-d", "--runtime", PYKATA_RUNTIME, containerd.image, name, "sleep", "1000",
        timeout=BOOT,
    )  # fmt: skip
    ref = "localhost/pyshim-checkpoint/kata-crun:1"
    try:
        result = containerd.ctr(
            "containers", "checkpoint", "--task", name, ref, timeout=CRIU, check=False
        )
        assert result.returncode != 0
        assert 'guest_runtime = "runc"' in result.stderr, result.stderr
        assert containerd.task_status(name) == "RUNNING"
    finally:
        containerd.ctr("images", "rm", ref, check=False)
        containerd.kill_and_delete(name, check=False)


def corrupt_checkpoint_blob(containerd: PrivateContainerd, ref: str) -> None:
    """Overwrite, in containerd's content store, the CRIU image files in the checkpoint's
    archive with garbage of the same size, as a disk's bit rot would (containerd checks no
    digest when it unpacks a checkpoint)."""
    digest = next(
        line.split()[2] for line in containerd.ctr("images", "ls").stdout.splitlines()[1:]
        if line.split()[0] == ref
    )  # fmt: skip
    index = json.loads(containerd.ctr("content", "get", digest).stdout)
    archive_digest = next(
        d["digest"] for d in index["manifests"] if d["mediaType"] == CHECKPOINT_MEDIA_TYPE
    )
    blobs = containerd.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
    blob = blobs / archive_digest.removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
        images = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".img")]
    assert images
    for member in images:
        data[member.offset_data : member.offset_data + member.size] = b"\xa5" * member.size
    blob.write_bytes(bytes(data))
