"""pykata's checkpoint image on the host side: bound into the VM's shared directory while the
guest writes it, moved in whole so that nothing the guest put there is mounted over, and the
log a failed checkpoint leaves read without following the guest's symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.agent.service import _without_criu
from shim.kata.state import (
    CHECKPOINT_LOG,
    VmPaths,
    keep_checkpoint_log,
    unshare_checkpoint,
    unshare_container,
)
from shim.kata.vm import Vm
from shim.sys.mount import mounts_under
from shim.ttrpc.errors import Code, TtrpcError


def vm_with_container(tmp_path: Path) -> Vm:
    paths = VmPaths(tmp_path / "vm")
    paths.container_dir("c1").mkdir(parents=True)
    paths.staging.mkdir()
    vm = Vm.__new__(Vm)
    vm.paths = paths
    return vm


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (bind mounts)")


@pytest.mark.usefixtures("root")
def test_the_image_dir_is_shared_while_the_guest_writes_it_then_unshared(tmp_path: Path) -> None:
    vm = vm_with_container(tmp_path)
    image = tmp_path / "image"
    image.mkdir()
    try:
        in_guest = vm.share_checkpoint("c1", str(image))
        assert in_guest == "/pyshim/shared/c1/checkpoint/image"
        shared = vm.paths.container_dir("c1") / "checkpoint" / "image"
        (shared / "inventory.img").write_bytes(b"criu")  # as the guest writes it through 9p
    finally:
        unshare_checkpoint(vm.paths, "c1")
    assert (image / "inventory.img").read_bytes() == b"criu"
    assert not mounts_under(str(vm.paths.root))
    assert list(vm.paths.container_dir("c1").iterdir()) == []
    assert list(vm.paths.staging.iterdir()) == []


@pytest.mark.usefixtures("root")
def test_a_name_the_guest_took_fails_the_share_and_mounts_nothing(tmp_path: Path) -> None:
    vm = vm_with_container(tmp_path)
    elsewhere = tmp_path / "host-dir"
    elsewhere.mkdir()
    # The guest writes the container's shared dir: a symlink there must not get our mount.
    (vm.paths.container_dir("c1") / "checkpoint").symlink_to(elsewhere)
    image = tmp_path / "image"
    image.mkdir()
    with pytest.raises(TtrpcError, match=f"cannot share {image} with the VM"):
        vm.share_checkpoint("c1", str(image))
    assert not mounts_under(str(tmp_path))
    assert list(elsewhere.iterdir()) == []
    unshare_container(vm.paths, "c1")


def test_a_failed_checkpoints_log_is_kept_in_the_bundle(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "vm")
    log = paths.container_dir("c1") / CHECKPOINT_LOG
    log.parent.mkdir(parents=True)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert keep_checkpoint_log(paths, "c1", str(bundle)) is None  # none written
    log.write_text("(00.1) Error (criu/cr-dump.c:2053): Dumping FAILED.\n")
    kept = keep_checkpoint_log(paths, "c1", str(bundle))
    assert kept == str(bundle / "criu-dump.log")
    assert "Dumping FAILED" in Path(kept).read_text()


def test_a_log_the_guest_made_a_symlink_is_not_followed(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "vm")
    log = paths.container_dir("c1") / CHECKPOINT_LOG
    log.parent.mkdir(parents=True)
    secret = tmp_path / "host-secret"
    secret.write_text("not for the bundle")
    log.symlink_to(secret)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert keep_checkpoint_log(paths, "c1", str(bundle)) is None
    assert not (bundle / "criu-dump.log").exists()


def test_a_runtime_without_checkpoint_names_the_one_with_it() -> None:
    crun = TtrpcError(Code.UNIMPLEMENTED, "crun has no checkpoint command (unknown command)")
    error = _without_criu(crun)
    assert error.code is Code.FAILED_PRECONDITION
    assert 'guest_runtime = "runc"' in error.message
    criu = TtrpcError(Code.UNKNOWN, "OCI runtime checkpoint failed: criu failed")
    assert _without_criu(criu) is criu
