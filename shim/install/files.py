"""The installer's file operations: atomic writes, backups, and writability checked up front."""

from __future__ import annotations

import os
import shutil
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
    """Replaces ``path`` atomically: containerd never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.pyshim-tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.chmod(mode)
    os.replace(temporary, path)


def back_up_and_replace(path: Path, backup: Path, text: str) -> None:
    """Copies ``path`` to ``backup``, then replaces what it names (a symlink stays one)."""
    shutil.copy2(path, backup)
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
