"""The container context a wasm runner enters before it loads its module: the OCI spec's
namespaces and bind mounts, as runc would give a Linux container's process.

The shim plans it (``plan``, pure: a JSON-ready dict in the runner's request) and the runner,
a fork of the shim, enters it (``enter``) first thing, single-threaded:

- **Namespaces.** network, ipc and uts: a path in the spec is joined (setns), e.g. CRI's pod
  netns under /var/run/netns and the pause's /proc/PID/ns/{ipc,uts}; an entry without a path
  gets a new namespace at the init (unshare) and its execs join the init's, as runc does.
  Not pid: setns on a pid namespace moves only the caller's later children, and a module has
  none (the runner must also keep the pid the shim reports); not user, cgroup, time or mount
  by path: a module has no uids, its cgroup is set by the shim, and its rootfs is a path in
  the shim's mount namespace.
- **Mounts.** A private mount namespace (unshared, then made a recursive slave: the host's
  unmounts still reach it, nothing of it reaches the host) where every bind mount of the spec
  is bound onto its destination in the rootfs, read-only where the spec says so. The rest
  (proc, sysfs, tmpfs /dev, ...) means nothing to a WASI module. The destination is resolved
  in the rootfs one component at a time with O_NOFOLLOW, symlinks read as if the rootfs were
  "/" (an absolute link or ".." never climbs above it), missing parts created as runc does,
  and the mount made onto the resolved O_PATH fd, so no symlink can lead it out of the rootfs.

Everything the runner opens here is close-on-exec and closed again; the namespaces end with
the runner.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import stat
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from shim.runtimes.spec import is_bind, is_recursive
from shim.sys._native import ffi, lib
from shim.sys.namespaces import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    setns,
    unshare,
)

# <linux/mount.h>: the cffi helper lacks the propagation flags; the kernel's ABI.
MS_SLAVE = 1 << 19
MS_REC = 1 << 14

# OCI namespace type -> clone flag and its /proc/PID/ns name: the ones a runner enters.
NAMESPACES: Mapping[str, tuple[int, str]] = {
    "network": (CLONE_NEWNET, "net"),
    "ipc": (CLONE_NEWIPC, "ipc"),
    "uts": (CLONE_NEWUTS, "uts"),
}
_BIND_REMOUNT_FLAGS = {"nosuid": lib.MS_NOSUID, "nodev": lib.MS_NODEV, "noexec": lib.MS_NOEXEC}
_MAX_SYMLINKS = 40  # the kernel's limit on links followed in one lookup


class Join(TypedDict):
    type: str
    path: str


class Bind(TypedDict):
    source: str
    destination: str
    recursive: bool
    readonly: bool
    flags: list[str]  # nosuid, nodev, noexec: kept on the read-only remount


class Context(TypedDict):
    join: list[Join]
    new: list[str]  # namespace types unshared afresh (the init only)
    hostname: str | None  # set in a new uts namespace
    binds: list[Bind]


def plan(spec: Mapping[str, Any], init_pid: int | None = None) -> Context:
    """The context of the spec's container for its init (`init_pid` None) or for an exec of
    the init running as `init_pid`, which joins the namespaces the init was given afresh."""
    linux = spec.get("linux") or {}
    join: list[Join] = []
    new: list[str] = []
    for namespace in linux.get("namespaces") or []:
        kind = str(namespace.get("type") or "")
        if kind not in NAMESPACES:
            continue
        path = str(namespace.get("path") or "")
        if path:
            join.append({"type": kind, "path": path})
        elif init_pid is not None:
            join.append({"type": kind, "path": f"/proc/{init_pid}/ns/{NAMESPACES[kind][1]}"})
        else:
            new.append(kind)
    hostname = spec.get("hostname") if "uts" in new else None
    return {
        "join": join,
        "new": new,
        "hostname": str(hostname) if hostname else None,
        "binds": binds(spec.get("mounts") or []),
    }


def binds(mounts: Sequence[Mapping[str, Any]]) -> list[Bind]:
    """The spec's bind mounts, in order, with the options that matter to a bind; fstab order:
    a later ro/rw wins."""
    found: list[Bind] = []
    for mount in mounts:
        if not is_bind(mount):
            continue
        options = [str(o) for o in mount.get("options") or []]
        readonly = False
        for option in options:
            if option in ("ro", "rw"):
                readonly = option == "ro"
        found.append(
            {
                "source": str(mount.get("source") or ""),
                "destination": str(mount.get("destination") or ""),
                "recursive": is_recursive(mount),
                "readonly": readonly,
                "flags": [o for o in options if o in _BIND_REMOUNT_FLAGS],
            }
        )
    return found


def open_namespaces(joins: Sequence[Join]) -> list[int]:
    """The namespace files to join, opened by the shim: a /proc/PID path stays the init's
    only while the shim has not reaped it, and a bad path fails before any runner exists."""
    fds: list[int] = []
    try:
        for join in joins:
            try:
                fds.append(os.open(join["path"], os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise _error(
                    exc.errno, f"open the {join['type']} namespace {join['path']}"
                ) from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def enter(context: Context, rootfs: str, namespace_fds: Sequence[int]) -> None:
    """In the runner, before anything else: join the namespaces (`namespace_fds`: the files of
    context["join"], in order; closed here) and create the new ones, then bind the mounts under
    `rootfs` in a private mount namespace. OSError names what failed."""
    try:
        for join, fd in zip(context["join"], namespace_fds, strict=True):
            try:
                setns(fd, NAMESPACES[join["type"]][0])
            except OSError as exc:
                raise _error(
                    exc.errno, f"join the {join['type']} namespace {join['path']}"
                ) from None
    finally:
        for fd in namespace_fds:
            os.close(fd)
    flags = CLONE_NEWNS
    for kind in context["new"]:
        flags |= NAMESPACES[kind][0]
    try:
        unshare(flags)
    except OSError as exc:
        raise _error(exc.errno, f"unshare namespaces {context['new'] + ['mount']}") from None
    if context["hostname"]:
        socket.sethostname(context["hostname"])
    _mount(None, "/", MS_REC | MS_SLAVE, "make / a recursive slave")
    for bind in context["binds"]:
        bind_into(rootfs, bind)


def bind_into(rootfs: str, bind: Bind) -> None:
    """Bind `bind` onto its destination inside `rootfs` (in the runner's own mount namespace)."""
    source, destination = bind["source"], bind["destination"]
    what = f"bind mount {source} on {destination}"
    try:
        is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    except OSError as exc:
        raise _error(exc.errno, f"{what}: source") from None
    try:
        target = open_in_root(rootfs, destination, "dir" if is_dir else "file")
    except OSError as exc:
        raise _error(exc.errno, f"{what}: destination in the rootfs") from None
    try:
        recursive = lib.MS_REC if bind["recursive"] else 0
        _mount(source, f"/proc/self/fd/{target}", lib.MS_BIND | recursive, what)
    finally:
        os.close(target)
    if not bind["readonly"] and not bind["flags"]:
        return
    # A bind takes its flags only from a remount, which must reach the new mount: the fd
    # opened before it still names the covered file, so look the destination up again.
    flags = lib.MS_BIND | lib.MS_REMOUNT | (lib.MS_RDONLY if bind["readonly"] else 0)
    for option in bind["flags"]:
        flags |= _BIND_REMOUNT_FLAGS[option]
    mounted = open_in_root(rootfs, destination, None)
    try:
        _mount(None, f"/proc/self/fd/{mounted}", flags, f"{what}: remount ({flags:#x})")
    finally:
        os.close(mounted)


def open_in_root(root: str, path: str, create: str | None) -> int:
    """An O_PATH fd of `path` resolved inside the directory `root` as if it were "/": each
    component opened with O_NOFOLLOW under the one before, a symlink's target resolved the
    same way (absolute from `root`), ".." stopping at `root`. With `create` ("dir" or
    "file"), missing directories are made and a missing last component is made a `create`."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = [root_fd]  # the directories of the current path, root first
    pending = collections.deque(_components(path))
    links = 0
    try:
        while pending:
            name = pending.popleft()
            if name == "..":
                if len(walked) > 1:
                    os.close(walked.pop())
                continue
            here = walked[-1]
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
            except FileNotFoundError:
                if create is None:
                    raise
                _create(name, here, "file" if not pending and create == "file" else "dir")
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(name, dir_fd=here)
                if target.startswith("/"):
                    while len(walked) > 1:
                        os.close(walked.pop())
                pending.extendleft(reversed(_components(target)))
                continue
            walked.append(fd)
            if pending and not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        if len(walked) == 1:
            return os.dup(root_fd)  # the root itself
        return walked.pop()
    finally:
        for fd in walked:
            os.close(fd)


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _create(name: str, directory: int, kind: str) -> None:
    try:
        if kind == "dir":
            os.mkdir(name, 0o755, dir_fd=directory)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(name, flags, 0o644, dir_fd=directory))
    except FileExistsError:
        pass  # made meanwhile: the open after it decides what it is


def _mount(source: str | None, target: str, flags: int, what: str) -> None:
    # The cffi helper's mount(2): the kernel ignores source and type for a remount or a
    # propagation change.
    if lib.mount(os.fsencode(source or "none"), os.fsencode(target), b"", flags, b""):
        raise _error(ffi.errno, what)


def _error(code: int | None, what: str) -> OSError:
    code = code or errno.EIO
    return OSError(code, f"{what}: {os.strerror(code)} (errno {code})")
