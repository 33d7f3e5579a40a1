"""A newc cpio initramfs (the format the kernel unpacks) from busybox-static, kernel modules and
an init script, built in memory: no cpio tool, no root, nothing written but the result."""

from __future__ import annotations

import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_TRAILER = "TRAILER!!!"
_CONSOLE = (5, 1)  # /dev/console: init's stdio before devtmpfs is mounted


@dataclass(frozen=True)
class Entry:
    path: str  # without a leading slash
    mode: int  # file type and permission bits
    data: bytes = b""  # a file's content, a symlink's target
    rdev: tuple[int, int] = (0, 0)  # a device node's major, minor


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """The cpio "newc" archive of `entries`, in order, with its trailer."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry(_TRAILER, 0)], start=1):
        name = entry.path.encode() + b"\0"
        fields = (
            ino, entry.mode, 0, 0,  # ino, mode, uid, gid
            2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
            0, len(entry.data), 0, 0,  # mtime, filesize, devmajor, devminor
            entry.rdev[0], entry.rdev[1], len(name), 0,  # rdevmajor, rdevminor, namesize, check
        )  # fmt: skip
        out += b"070701" + b"".join(b"%08X" % field for field in fields) + name
        out += _padding(len(out))
        out += entry.data + _padding(len(entry.data))
    return bytes(out)


def initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]], init: str) -> bytes:
    """/init (a busybox sh script), /bin/busybox, and modules as /lib/modules/<name>."""
    directory, executable = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    entries = [Entry(name, directory) for name in ("bin", "dev", "lib", "lib/modules", "proc")]
    entries += [Entry(name, directory) for name in ("sys", "newroot")]
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=_CONSOLE),
        Entry("bin/busybox", executable, busybox),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        Entry("init", executable, init.encode()),
    ]
    entries += [Entry(f"lib/modules/{name}", stat.S_IFREG | 0o644, data) for name, data in modules]
    return newc_archive(entries)


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)
