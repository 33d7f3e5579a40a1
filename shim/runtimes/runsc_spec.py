"""The OCI spec adapted to the runsc that runs it, before `runsc create` (and an exec's
process before `runsc exec`): what containerd hands out that this runsc cannot take, or
ignores, made into what it can, with a warning where the container gets less than it asked.

* Capabilities. runsc refuses a whole container for a capability name it does not know
  ("unknown capability CAP_PERFMON"): gVisor releases before 2023 predate CAP_PERFMON, CAP_BPF
  and CAP_CHECKPOINT_RESTORE (Linux 5.8/5.9; gVisor issue 8529), which containerd gives
  privileged containers and `capabilities: add: [ALL]`. Those names are dropped from every
  set, as runc ignores names its kernel lacks. What runsc knows is read from its binary:
  its capability table is compiled in as string literals, so a name it knows is in the file.
  Its release date would do only with the date of the gVisor change, which is not known
  here, and builds without a date (from source, a distribution's) would go unjudged.
* readonlyPaths. This runsc ignores them. Each one in the rootfs or in a bind mount becomes a
  read-only bind mount of itself, appended after the spec's mounts (then the mounts below it
  again, which stay as they were: runc's remount is not recursive either). A path inside
  gVisor's own /proc or /sys or a tmpfs cannot be bound so: it is logged. gVisor's /proc
  has no /proc/bus, /proc/fs, /proc/irq or /proc/sysrq-trigger, and its /proc/sys is the
  sandbox kernel's (writable entries change only the sandbox's netstack and ptrace scope).
* maskedPaths. This runsc ignores them too. Each one in the rootfs or in a bind mount is
  hidden as runc hides it: a directory under a read-only empty tmpfs, a file under an empty
  read-only file (runc's /dev/null is a device, which runsc's gofer would not serve): reading
  it gives nothing, running it EACCES. Those in gVisor's own /proc or /sys are the sandbox
  kernel's (containerd's defaults all are).
* Mounts below a read-only volume. runsc serves a bind's source and every host mount below it
  as one file system, so a non-recursive read-only bind ("rbind" + "ro") would make those
  mounts read-only too (runc leaves them as they are: critest's non-recursive read-only
  mount spec). Each one gets a bind of its own after its parent, with its own read-only state.
* Seccomp. runsc applies the spec's seccomp only with --oci-seccomp (pyshim install writes it
  into runsc.toml); without it a spec asking for seccomp gets a warning. Even with it, runsc
  releases before release-20260330.0 confine the container's own processes, not those
  `runsc exec` starts (the runsc backend warns at a container's first exec).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import mmap
import os
import posixpath
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shim.runtimes.spec import is_bind, is_readonly_top_only, submount_bind
from shim.sys.files import replace_file
from shim.sys.mount import submounts_of

log = logging.getLogger(__name__)

SANDBOX_KERNEL = "the sandbox kernel's"  # a path in gVisor's own /proc or /sys

CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
# Linux's capabilities up to 5.7 (0-37): in gVisor's table since its first release.
LEGACY_CAPABILITIES = frozenset(
    f"CAP_{name}"
    for name in (
        *("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID"),
        *("SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST"),
        *("NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO"),
        *("SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE"),
        *("SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE"),
        *("AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM"),
        *("BLOCK_SUSPEND", "AUDIT_READ"),
    )
)
GO_TRUE = ("1", "t", "T", "true", "TRUE", "True")  # what Go's flag package takes as true

# (binary's real path, mtime) -> capability name -> whether that runsc knows it.
_known: dict[tuple[str, int], dict[str, bool]] = {}


def capability_names(process: Mapping[str, Any]) -> set[str]:
    sets = process.get("capabilities") or {}
    return {str(name) for key in CAPABILITY_SETS for name in sets.get(key) or ()}


def drop_capabilities(process: dict[str, Any], unknown: set[str]) -> list[str]:
    """Takes `unknown` out of every capability set of the process; the names it had."""
    sets = process.get("capabilities") or {}
    dropped: set[str] = set()
    for key in CAPABILITY_SETS:
        names = sets.get(key)
        if names:
            dropped.update(n for n in names if n in unknown)
            sets[key] = [n for n in names if n not in unknown]
    return sorted(dropped)


def _scan(path: str, names: Iterable[str]) -> dict[str, bool] | None:
    """Which of `names` are strings in the binary at `path`; None when the file tells
    nothing (unreadable, or packed: not even CAP_CHOWN shows)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b"CAP_CHOWN") < 0:
                return None
            return {name: data.find(name.encode()) >= 0 for name in names}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s for its capability names: %s", path, exc)
        return None


async def unknown_capabilities(binary: str, names: set[str]) -> set[str]:
    """The names among `names` that the runsc `binary` does not know (none if it cannot tell)."""
    asked = {n for n in names if n not in LEGACY_CAPABILITIES}
    if not asked:
        return set()
    path = shutil.which(binary)
    if path is None:
        return set()  # runsc create will say it is missing
    path = os.path.realpath(path)
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except OSError:
        return set()
    known = _known.setdefault(key, {})
    missing = asked - known.keys()
    if missing:
        # A worker thread: the binary is tens of MB (read once per shim and binary).
        scanned = await asyncio.to_thread(_scan, path, missing)
        if scanned is None:
            return set()
        known.update(scanned)
    return {name for name in asked if not known[name]}


async def adapt_capabilities(
    process: dict[str, Any], binary: str, container_id: str, what: str = "process"
) -> bool:
    """Drops the capabilities this runsc does not know from `process`; whether it changed."""
    unknown = await unknown_capabilities(binary, capability_names(process))
    dropped = drop_capabilities(process, unknown) if unknown else []
    if dropped:
        log.warning(
            "%s: %s does not know %s: dropped from the %s's capabilities (it would refuse "
            "the container)", container_id, binary, ", ".join(dropped), what,
        )  # fmt: skip
    return bool(dropped)


def warn_unapplied_seccomp(
    spec: Mapping[str, Any], flags: Mapping[str, str], container_id: str, config: str
) -> None:
    if not (spec.get("linux") or {}).get("seccomp"):
        return
    if flags.get("oci-seccomp", "false") in GO_TRUE:
        return
    where = config or "the runsc.toml of the runtime options"
    log.warning(
        "%s: the spec asks for a seccomp profile, which runsc applies only with "
        '--oci-seccomp: it is not enforced (set oci-seccomp = "true" under [runsc_config] '
        "in %s)", container_id, where,
    )  # fmt: skip


def _covering_mount(
    mounts: Sequence[Mapping[str, Any]], path: str
) -> tuple[int, Mapping[str, Any]] | None:
    """The last of the longest-destination mounts that `path` is at or under."""
    best: tuple[int, Mapping[str, Any]] | None = None
    best_length = -1
    for mount in mounts:
        destination = _absolute(str(mount.get("destination") or "/"))
        under = path == destination or path.startswith(destination.rstrip("/") + "/")
        if under and len(destination) >= best_length:
            best, best_length = (len(destination), mount), len(destination)
    return best


def _absolute(path: str) -> str:
    # normpath keeps a leading "//" (POSIX leaves its meaning open).
    return posixpath.normpath("/" + path.lstrip("/"))


def _resolve_plain(base: str, relative: str) -> tuple[str, str]:
    """`base`/`relative` on the host, and "" if it exists with no symlink on the way; else
    the path and why not. A symlink in the container's files could point anywhere on the
    host, where the bind mount's source is looked up."""
    path = base
    for part in [p for p in relative.split("/") if p]:
        path = os.path.join(path, part)
        try:
            if os.path.islink(path):
                return path, "is a symlink"
            os.lstat(path)
        except FileNotFoundError:
            return path, "missing"
        except OSError as exc:
            return path, str(exc)
    return path, ""


def submount_binds(spec: dict[str, Any]) -> bool:
    """After each non-recursive read-only bind, a bind of each host mount below its source;
    whether the spec changed."""
    mounts: list[dict[str, Any]] = []
    changed = False
    for mount in spec.get("mounts") or []:
        mounts.append(mount)
        source = str(mount.get("source") or "")
        if is_readonly_top_only(mount) and os.path.isdir(source):
            below = [submount_bind(mount, s) for s in submounts_of(os.path.realpath(source))]
            mounts += below
            changed = changed or bool(below)
    if changed:
        spec["mounts"] = mounts
    return changed


def _host_source(path: str, mounts: Sequence[Mapping[str, Any]], rootfs: str) -> tuple[str, str]:
    """Where the container's `path` is on the host, and "" or why it cannot be bound there:
    SANDBOX_KERNEL (in gVisor's own /proc or /sys), "missing", or a reason naming the place."""
    covering = _covering_mount(mounts, path)
    if covering is None:
        source, why = _resolve_plain(rootfs, path)
    elif is_bind(covering[1]):
        length, mount = covering
        source, why = _resolve_plain(str(mount.get("source") or ""), path[length:])
    elif covering[1].get("type") in ("proc", "sysfs"):
        return "", SANDBOX_KERNEL
    else:
        return "", f"on a {covering[1].get('type')} mount"
    return source, (f"{source} {why}" if why and why != "missing" else why)


def _host_places(
    spec: dict[str, Any], bundle: str, container_id: str, field: str, outcome: str
) -> list[tuple[str, str]]:
    """(path, where it is on the host) of each of the spec's `field` paths (readonlyPaths,
    maskedPaths: runsc ignores both) that a mount can reach. A path that is not there is left
    out, as runc leaves it; the others are logged, ending with `outcome`."""
    root = str((spec.get("root") or {}).get("path") or "rootfs")
    rootfs = os.path.join(bundle, root)  # an absolute root stays as it is
    mounts = spec.get("mounts") or []
    places: list[tuple[str, str]] = []
    sandbox_kernel: list[str] = []
    unreachable: list[str] = []
    for raw in (spec.get("linux") or {}).get(field) or []:
        path = _absolute(str(raw))
        source, why = _host_source(path, mounts, rootfs)
        if not why:
            places.append((path, source))
        elif why != "missing":
            (sandbox_kernel if why == SANDBOX_KERNEL else unreachable).append(f"{path} ({why})")
    if sandbox_kernel:
        log.info(
            "%s: %s in gVisor's own /proc or /sys are the sandbox kernel's: %s",
            container_id, field, ", ".join(sandbox_kernel),
        )  # fmt: skip
    if unreachable:
        log.warning(
            "%s: runsc ignores %s and these cannot be done with mounts: %s: %s",
            container_id, field, ", ".join(unreachable), outcome,
        )  # fmt: skip
    return places


def readonly_binds(spec: dict[str, Any], bundle: str, container_id: str) -> bool:
    """Turns the spec's readonlyPaths into read-only bind mounts of themselves; whether the
    spec changed."""
    places = _host_places(spec, bundle, container_id, "readonlyPaths", "they stay writable")
    if not places:
        return False
    mounts: list[dict[str, Any]] = spec.setdefault("mounts", [])
    original = list(mounts)
    for path, source in places:
        mounts.append({"destination": path, "type": "bind", "source": source,
                       "options": ["rbind", "ro"]})  # fmt: skip
        # What was mounted below it stays, on top of the read-only bind.
        below = path.rstrip("/") + "/"
        mounts += [
            copy.deepcopy(m)
            for m in original
            if _absolute(str(m.get("destination") or "/")).startswith(below)
        ]
    return True


def masked_paths(spec: dict[str, Any], bundle: str, container_id: str) -> bool:
    """Masks the spec's maskedPaths, which this runsc ignores, as runc does: a directory under
    a read-only empty tmpfs, a file under an empty read-only file that cannot be run
    (runc binds /dev/null, a device file runsc's gofer would not serve). Appended
    last, so they hide whatever is mounted there. Whether the spec changed."""
    places = _host_places(spec, bundle, container_id, "maskedPaths", "they stay visible")
    if not places:
        return False
    mounts: list[dict[str, Any]] = spec.setdefault("mounts", [])
    for path, source in places:
        if os.path.isdir(source):
            mounts.append({"destination": path, "type": "tmpfs", "source": "tmpfs",
                           "options": ["ro", "nosuid", "nodev", "noexec"]})  # fmt: skip
        else:
            mounts.append({"destination": path, "type": "bind", "source": _mask_file(bundle),
                           "options": ["bind", "ro"]})  # fmt: skip
    return True


def _mask_file(bundle: str) -> str:
    """The bundle's empty file (r--r--r--) that masked files are bound to."""
    path = os.path.join(bundle, "masked-file")
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
    return path


def write_spec(bundle: str, spec: Mapping[str, Any]) -> None:
    """Replaces the bundle's config.json (what runsc reads) in one rename."""
    path = os.path.join(bundle, "config.json")
    replace_file(path, json.dumps(spec).encode(), os.stat(path).st_mode & 0o777)
