"""Rootfs mounts from containerd's Mount list; the real ones need root."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.sys._native import lib
from shim.sys.mount import MountSpec, mount_rootfs, parse_options, unmount_all


def mount_count(path: Path) -> int:
    """How many mounts sit exactly on `path` (stacked mounts count separately)."""
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == str(path))


@pytest.fixture
def rootfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    root = tmp_path / "rootfs"
    root.mkdir()
    yield root
    unmount_all(str(root))
    assert mount_count(root) == 0


def make_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_options_split_into_flags_and_data_like_containerd() -> None:
    flags, data = parse_options(["rbind", "ro", "nosuid", "defaults", "index=off", "rw", "dev"])
    assert flags == lib.MS_BIND | lib.MS_REC | lib.MS_NOSUID
    assert data == "defaults,index=off"


def test_bind_mount_shows_the_source_and_unmounts(rootfs: Path, tmp_path: Path) -> None:
    source = make_dir(tmp_path / "src", {"hello": "world"})
    mount_rootfs([MountSpec("bind", str(source), "", ["rbind", "rw"])], str(rootfs))
    assert (rootfs / "hello").read_text() == "world"
    (rootfs / "new").write_text("x")
    assert (source / "new").read_text() == "x"
    unmount_all(str(rootfs))
    assert mount_count(rootfs) == 0
    assert not (rootfs / "hello").exists()


def test_read_only_bind_is_remounted_read_only(rootfs: Path, tmp_path: Path) -> None:
    source = make_dir(tmp_path / "src", {"hello": "world"})
    mount_rootfs([MountSpec("bind", str(source), "", ["rbind", "ro"])], str(rootfs))
    assert (rootfs / "hello").read_text() == "world"
    with pytest.raises(OSError) as raised:
        (rootfs / "new").write_text("x")
    assert raised.value.errno == errno.EROFS
    (source / "still-writable").write_text("y")


def test_overlay_merges_layers_and_writes_to_upper(rootfs: Path, tmp_path: Path) -> None:
    lower1 = make_dir(tmp_path / "l1", {"a": "from l1", "shared": "l1"})
    lower2 = make_dir(tmp_path / "l2", {"b": "from l2", "shared": "l2"})
    upper = make_dir(tmp_path / "upper", {})
    work = make_dir(tmp_path / "work", {})
    options = [f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower1}:{lower2}"]
    mount_rootfs([MountSpec("overlay", "overlay", "", options)], str(rootfs))
    assert (rootfs / "a").read_text() == "from l1"
    assert (rootfs / "b").read_text() == "from l2"
    assert (rootfs / "shared").read_text() == "l1"  # the first lowerdir is the top layer
    (rootfs / "c").write_text("new")
    assert (upper / "c").read_text() == "new"


def test_overlay_with_lowerdirs_longer_than_a_page_mounts(rootfs: Path, tmp_path: Path) -> None:
    snapshots = tmp_path / ("io.containerd.snapshotter.v1.overlayfs-" + "x" * 60) / "snapshots"
    layers = [make_dir(snapshots / str(i) / "fs", {f"f{i}": str(i)}) for i in range(60)]
    lowerdir = ":".join(str(layer) for layer in layers)
    assert len(lowerdir) > os.sysconf("SC_PAGE_SIZE")
    mount_rootfs([MountSpec("overlay", "overlay", "", [f"lowerdir={lowerdir}"])], str(rootfs))
    assert sorted(os.listdir(rootfs)) == sorted(f"f{i}" for i in range(60))


def test_target_is_joined_under_rootfs(rootfs: Path, tmp_path: Path) -> None:
    source = make_dir(tmp_path / "src", {"hello": "world"})
    (rootfs / "sub").mkdir()
    mount_rootfs([MountSpec("bind", str(source), "/sub", ["bind"])], str(rootfs))
    try:
        assert (rootfs / "sub" / "hello").read_text() == "world"
    finally:
        unmount_all(str(rootfs / "sub"))


def test_target_escaping_rootfs_is_rejected(rootfs: Path, tmp_path: Path) -> None:
    source = make_dir(tmp_path / "src", {})
    (rootfs / "link").symlink_to(tmp_path)
    for target in ("../outside", "link"):
        with pytest.raises(OSError, match="escapes rootfs"):
            mount_rootfs([MountSpec("bind", str(source), target, ["bind"])], str(rootfs))
    assert mount_count(tmp_path) == 0


def test_failure_undoes_earlier_mounts_and_names_the_failed_one(
    rootfs: Path, tmp_path: Path
) -> None:
    source = make_dir(tmp_path / "src", {"hello": "world"})
    mounts = [
        MountSpec("bind", str(source), "", ["rbind", "ro"]),
        MountSpec("bind", str(tmp_path / "missing"), "", ["rbind"]),
    ]
    with pytest.raises(OSError, match="missing") as raised:
        mount_rootfs(mounts, str(rootfs))
    assert raised.value.errno == errno.ENOENT
    assert mount_count(rootfs) == 0


def test_unmount_all_removes_stacked_mounts(rootfs: Path, tmp_path: Path) -> None:
    layers = [make_dir(tmp_path / f"src{i}", {"layer": str(i)}) for i in range(3)]
    mount_rootfs([MountSpec("bind", str(s), "", ["bind"]) for s in layers], str(rootfs))
    assert mount_count(rootfs) == 3
    assert (rootfs / "layer").read_text() == "2"
    unmount_all(str(rootfs))
    assert mount_count(rootfs) == 0


def test_unmount_all_of_a_missing_or_unmounted_target_is_a_no_op(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("umount2 needs root")
    unmount_all(str(tmp_path / "missing"))
    unmount_all(str(tmp_path))
    assert mount_count(tmp_path) == 0


def test_loop_and_fuse_mounts_are_refused_clearly(tmp_path: Path) -> None:
    for spec in (
        MountSpec("ext4", str(tmp_path / "img"), "", ["loop"]),
        MountSpec("fuse.sshfs", "host:/", "", []),
    ):
        with pytest.raises(OSError, match="not supported") as raised:
            mount_rootfs([spec], str(tmp_path))
        assert raised.value.errno == errno.ENOTSUP
