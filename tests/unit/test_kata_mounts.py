"""How a container's bind mounts reach the guest: a non-recursive read-only volume keeps the
host mounts below it as binds of their own (the guest sees the source as one 9p file system),
and plain binds are shared without their submounts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from shim.kata.guestspec import guest_spec
from shim.kata.state import VmPaths, unshare_container
from shim.kata.vm import Vm
from shim.sys.mount import Submount

SHARED = "/pyshim/shared/c1/mounts"


def spec_with(*mounts: dict[str, Any]) -> dict[str, Any]:
    return {"mounts": list(mounts), "linux": {}}


def volume(destination: str, *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": "/host", "options": [*options]}


def test_a_read_only_rbind_gets_a_bind_per_host_mount_below_it() -> None:
    spec = spec_with(
        volume("/vol", "rbind", "rprivate", "ro"), {"destination": "/run", "type": "tmpfs"}
    )
    below = {"mounts/0": [Submount("tmp", False), Submount("tmp/ro", True)]}
    guest = guest_spec(spec, "c1", vm_pid=1, sandbox_guest_pid=None, submounts=below)
    assert guest["mounts"] == [
        {"destination": "/vol", "type": "bind", "source": f"{SHARED}/0",
         "options": ["rbind", "rprivate", "ro"]},
        {"destination": "/vol/tmp", "type": "bind", "source": f"{SHARED}/0/tmp",
         "options": ["bind", "rprivate", "rw"]},
        {"destination": "/vol/tmp/ro", "type": "bind", "source": f"{SHARED}/0/tmp/ro",
         "options": ["bind", "rprivate", "ro"]},
        {"destination": "/run", "type": "tmpfs"},
    ]  # fmt: skip


@pytest.mark.parametrize(
    "options", [("rbind", "rw"), ("rbind", "rro"), ("rbind", "ro", "rro"), ("bind", "ro")]
)
def test_other_binds_are_one_mount_in_the_guest(options: tuple[str, ...]) -> None:
    below = {"mounts/0": [Submount("tmp", False)]}
    guest = guest_spec(
        spec_with(volume("/vol", *options)), "c1", vm_pid=1, sandbox_guest_pid=None,
        submounts=below,
    )  # fmt: skip
    assert [m["destination"] for m in guest["mounts"]] == ["/vol"]


@pytest.fixture
def host_volume(tmp_path: Path) -> Any:
    """A directory with a read-only tmpfs at `inner` (as root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    source = tmp_path / "source"
    (source / "inner").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", source / "inner"], check=True)
    yield source
    subprocess.run(["umount", "-l", source / "inner"], check=True)


@pytest.mark.parametrize("recursive", [True, False])
def test_share_binds_as_the_spec_and_reports_the_mounts_below(
    tmp_path: Path, host_volume: Path, recursive: bool
) -> None:
    paths = VmPaths(tmp_path / "vm")
    paths.shared.mkdir(parents=True)
    paths.staging.mkdir()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    vm = Vm.__new__(Vm)
    vm.paths = paths
    try:
        submounts = vm.share("c1", str(rootfs), {"mounts/0": (str(host_volume), recursive)})
        shared_inner = paths.container_dir("c1") / "mounts" / "0" / "inner"
        assert os.path.ismount(shared_inner) is recursive
        assert submounts == ({"mounts/0": [Submount("inner", True)]} if recursive else {})
    finally:
        unshare_container(paths, "c1")
    assert not paths.container_dir("c1").exists()
