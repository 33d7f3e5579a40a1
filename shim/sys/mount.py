"""Mounting a container's rootfs from containerd's Mount list, and unmounting it (PROTOCOL J)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from shim.sys._native import lib
from shim.sys.busy import retry_while_busy
from shim.sys.native import last_error

# fstab option -> (clears the flag, flag); every other option goes to the data string.
_OPTION_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, lib.MS_SYNCHRONOUS),
    "atime": (True, lib.MS_NOATIME),
    "bind": (False, lib.MS_BIND),
    "dev": (True, lib.MS_NODEV),
    "diratime": (True, lib.MS_NODIRATIME),
    "dirsync": (False, lib.MS_DIRSYNC),
    "exec": (True, lib.MS_NOEXEC),
    "mand": (False, lib.MS_MANDLOCK),
    "noatime": (False, lib.MS_NOATIME),
    "nodev": (False, lib.MS_NODEV),
    "nodiratime": (False, lib.MS_NODIRATIME),
    "noexec": (False, lib.MS_NOEXEC),
    "nomand": (True, lib.MS_MANDLOCK),
    "norelatime": (True, lib.MS_RELATIME),
    "nostrictatime": (True, lib.MS_STRICTATIME),
    "nosuid": (False, lib.MS_NOSUID),
    "rbind": (False, lib.MS_BIND | lib.MS_REC),
    "relatime": (False, lib.MS_RELATIME),
    "remount": (False, lib.MS_REMOUNT),
    "ro": (False, lib.MS_RDONLY),
    "rw": (True, lib.MS_RDONLY),
    "strictatime": (False, lib.MS_STRICTATIME),
    "suid": (True, lib.MS_NOSUID),
    "sync": (False, lib.MS_SYNCHRONOUS),
}

# The kernel copies at most one page of mount data (and silently cuts the rest).
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Like containerd, shorten overlay lowerdirs a little before the hard limit.
_OVERLAY_COMPACT_AT = _PAGE_SIZE - 512

_UNMOUNT_BUSY_RETRIES = 50
_UNMOUNT_BUSY_DELAY = 0.05

# <sys/mount.h>, <linux/mount.h>, <fcntl.h>: the kernel's ABI. The cffi helper calls
# open_tree(2) and move_mount(2) (Linux 5.2) by number: glibc wraps them only from 2.36, and
# its headers before that lack these flags too.
MS_SLAVE = 1 << 19
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    target: str  # relative to the rootfs; empty (containerd 1.6) = the rootfs itself
    options: Sequence[str]


def parse_options(options: Sequence[str]) -> tuple[int, str]:
    """fstab-style options -> (mount flags, data string), as containerd splits them."""
    flags = 0
    data = []
    for option in options:
        known = _OPTION_FLAGS.get(option)
        if known is None:
            data.append(option)
        elif known[0]:
            flags &= ~known[1]
        else:
            flags |= known[1]
    return flags, ",".join(data)


def mount_rootfs(mounts: Sequence[MountSpec], rootfs: str) -> None:
    """Apply `mounts` in order onto `rootfs`; on failure undo them all and raise OSError."""
    mounted: list[str] = []
    try:
        for spec in mounts:
            _mount(spec, _target_in(rootfs, spec), mounted)
    except OSError:
        # Lazy detach: a failed rbind may have left submounts that make a plain umount EBUSY.
        for target in reversed(mounted):
            with contextlib.suppress(OSError):
                _umount2(target, lib.MNT_DETACH)
        raise


def unmount_all(target: str) -> None:
    """Unmount everything stacked on `target`; a missing target is fine."""
    if not os.path.exists(target):
        return
    while True:
        try:
            _unmount_retrying_busy(target)
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a mount point (any more)
                return
            raise


def detach(target: str) -> None:
    """Lazy unmount (MNT_DETACH): gone from the tree now, released when no longer in use."""
    _umount2(target, lib.MNT_DETACH)


def make_slave(target: str) -> None:
    """The mounts at and below `target` get the mounts and unmounts of their peers (if they
    had any) and pass none on."""
    if lib.mount(b"", os.fsencode(target), b"", MS_SLAVE | lib.MS_REC, b""):
        raise last_error(f"make {target} a slave mount")


def clone_tree(source: str, *, recursive: bool) -> int:
    """A detached copy of the mount at `source` (a bind mount's source: a file or directory),
    with the mounts below it if `recursive`: an fd (close-on-exec) for attach_tree. The copy
    is of the mounts the calling thread's mount namespace has."""
    flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | (_AT_RECURSIVE if recursive else 0)
    fd = lib.pyshim_open_tree(_AT_FDCWD, os.fsencode(source), flags)
    if fd < 0:
        raise last_error(f"open_tree {source}")
    return fd


def attach_tree(tree: int, target: str) -> None:
    """Mount the copy clone_tree made (of a directory onto a directory, of a file onto a file)
    at `target`, as slaves: nothing mounted or unmounted below it reaches the source's peers."""
    moved = lib.pyshim_move_mount(
        tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH
    )
    if moved:
        raise last_error(f"move_mount onto {target}")
    make_slave(target)


def _mount(spec: MountSpec, target: str, mounted: list[str]) -> None:
    if spec.type.startswith(("fuse.", "fuse3.")) or "loop" in spec.options:
        raise OSError(errno.ENOTSUP, f"{_describe(spec, target)}: fuse and loop are not supported")
    flags, data = parse_options(spec.options)
    # A remount without new data changes flags only; mount(2) with the data would fail.
    if not flags & lib.MS_REMOUNT or data:
        with _short_overlay_data(spec.type, data) as short_data:
            if len(short_data) >= _PAGE_SIZE:
                raise OSError(errno.E2BIG, f"{_describe(spec, target)}: options too long")
            _sys_mount(spec, spec.source, target, spec.type, flags, short_data)
        mounted.append(target)
    read_only_bind = lib.MS_BIND | lib.MS_RDONLY
    if flags & read_only_bind == read_only_bind:
        # MS_RDONLY is ignored when creating a bind mount; it only takes effect on a remount.
        _sys_mount(spec, "", target, "", flags | lib.MS_REMOUNT, "")


def _target_in(rootfs: str, spec: MountSpec) -> str:
    if not spec.target:
        return rootfs
    root = os.path.realpath(rootfs)
    target = os.path.realpath(os.path.join(root, spec.target.lstrip("/")))
    if os.path.commonpath([root, target]) != root:
        raise OSError(errno.EINVAL, f"{_describe(spec, target)}: target escapes rootfs {rootfs}")
    return target


@contextlib.contextmanager
def _short_overlay_data(fs_type: str, data: str) -> Iterator[str]:
    """Overlay data with the lowerdirs' common directory replaced by a /proc/self/fd link
    while the mount runs: many image layers make `lowerdir=` longer than a page."""
    options = data.split(",")
    lower = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), None)
    if fs_type != "overlay" or len(data) < _OVERLAY_COMPACT_AT or lower is None:
        yield data
        return
    dirs = options[lower].removeprefix("lowerdir=").split(":")
    common = os.path.commonpath(dirs)
    fd = os.open(common, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        link = f"/proc/self/fd/{fd}"
        options[lower] = "lowerdir=" + ":".join(
            os.path.join(link, os.path.relpath(d, common)) for d in dirs
        )
        yield ",".join(options)
    finally:
        os.close(fd)


def _sys_mount(
    spec: MountSpec, source: str, target: str, fs_type: str, flags: int, data: str
) -> None:
    if lib.mount(os.fsencode(source), os.fsencode(target), fs_type.encode(), flags, data.encode()):
        raise last_error(_describe(spec, target))


def _describe(spec: MountSpec, target: str) -> str:
    return f"mount {spec.type} {spec.source} on {target} ({','.join(spec.options)})"


def _unmount_retrying_busy(target: str) -> None:
    retry_while_busy(
        lambda: _umount2(target, 0),
        _UNMOUNT_BUSY_RETRIES,
        _UNMOUNT_BUSY_DELAY,
        f"unmount {target}: still busy after {_UNMOUNT_BUSY_RETRIES} tries",
    )


def _umount2(target: str, flags: int) -> None:
    if lib.umount2(os.fsencode(target), flags):
        raise last_error(f"unmount {target}")


def mountinfo_field(field: str) -> str:
    """A path field of /proc/self/mountinfo, which escapes space, tab, newline and backslash as
    \\ooo."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_table() -> list[tuple[str, list[str]]]:
    """(mount point, the mount's own options) of each mount, in /proc/self/mountinfo's order
    (a mount over another comes after it)."""
    with open("/proc/self/mountinfo") as f:
        return [
            (mountinfo_field(fields[4]), fields[5].split(","))
            for fields in (line.split() for line in f)
        ]


@dataclass(frozen=True)
class Submount:
    """A mount below a directory: its path relative to the directory, and its read-only state."""

    path: str
    readonly: bool


def submounts_of(directory: str) -> list[Submount]:
    """The mounts strictly below `directory`, shallowest first."""
    prefix = directory.rstrip("/") + "/"
    found = [
        Submount(point[len(prefix) :], "ro" in options)
        for point, options in mount_table()
        if point.startswith(prefix)
    ]
    # A path mounted twice: the later (upper) one is what is seen there.
    unique = {submount.path: submount for submount in found}
    return sorted(unique.values(), key=lambda s: s.path.count("/"))


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix``, deepest first."""
    points = [p for p, _ in mount_table() if p == prefix or p.startswith(prefix + "/")]
    return sorted(points, key=len, reverse=True)
