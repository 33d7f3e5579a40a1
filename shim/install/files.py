"""The installer's file operations: atomic writes, backups, and writability checked up front."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from shim.install.errors import InstallError


def backup_path(config: Path) -> Path:
    backup = config.with_name(f"{config.name}.pyshim-backup")
    stamp, n = time.strftime("%Y%m%dT%H%M%S"), 0
    while os.path.lexists(backup):
        n += 1
        suffix = stamp if n == 1 else f"{stamp}.{n}"
        backup = config.with_name(f"{config.name}.pyshim-backup.{suffix}")
    return backup


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc}") from exc


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replaces ``path`` atomically and durably: containerd never reads half a file, and a
    power cut leaves the old file or the new one, never an empty one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def back_up_and_replace(path: Path, backup: Path, text: str) -> None:
    """Copies ``path`` to ``backup``, then replaces what it names (a symlink stays one)."""
    shutil.copy2(path, backup)
    with open(backup, "rb") as copy:  # the backup is on disk before the original changes
        os.fsync(copy.fileno())
    target = path.resolve()
    write_atomic(target, text, mode=target.stat().st_mode & 0o7777)


def check_writable(path: Path) -> None:
    """Refuses before the first change when a file could not be written (or removed)."""
    directory = path.parent
    while not directory.exists():
        directory = directory.parent
    if not directory.is_dir():
        raise InstallError(f"cannot write {path}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InstallError(f"cannot write {path}: {directory} is not writable")
