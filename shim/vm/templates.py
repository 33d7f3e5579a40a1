"""The store of VM templates: a booted VM's saved state, which new VMs restore from.

    <directory>/<key>/info.json   what the template was made from (written last)
    <directory>/<key>/memory      the guest's RAM
    <directory>/<key>/state       QEMU's device state
    <directory>/<key>.lock        held (flock) by the one process creating <key>

A template appears whole or not at all: it is filled in a hidden directory that is renamed
to <key> once its info.json is there, and removed by a rename out of sight before it is
deleted. Removing one while VMs restored from it run is safe: they hold its files open or
mapped, and an unlinked file lives on until its last user lets go.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFO = "info.json"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a name, never a path


def template_key(**inputs: str | int) -> str:
    """A template's key: the digest of everything it was made from."""
    text = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Template:
    directory: Path
    key: str
    info: dict[str, Any]

    @property
    def memory(self) -> Path:
        return self.directory / "memory"

    @property
    def state(self) -> Path:
        return self.directory / "state"


class TemplateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def list(self) -> list[Template]:
        """The complete templates, by key."""
        try:
            names = sorted(entry.name for entry in os.scandir(self.directory) if entry.is_dir())
        except FileNotFoundError:
            return []
        found = (self.get(name) for name in names if _KEY.fullmatch(name))
        return [template for template in found if template is not None]

    def get(self, key: str) -> Template | None:
        directory = self._directory(key)
        try:
            info = json.loads((directory / INFO).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Template(directory, key, info)

    def remove(self, key: str) -> bool:
        """Removes the template `key`; False if there was none."""
        try:
            self._discard(self._directory(key))
        except FileNotFoundError:
            return False
        return True

    def remove_all(self) -> builtins.list[str]:  # `list` here is the method above
        """Removes every template; their keys."""
        return [template.key for template in self.list() if self.remove(template.key)]

    @contextlib.contextmanager
    def creating(self, key: str) -> Iterator[Path | None]:
        """A fresh directory to fill with the template `key`, or None while another process
        creates it. On a normal exit a filled directory (its info.json written last) becomes
        the template, replacing any before it; otherwise it is deleted."""
        directory = self._directory(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.directory / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            # Left by a creator that died: nobody else fills them while we hold the lock.
            for stale in self.directory.glob(f".{key}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            filling = self.directory / f".{key}.tmp-{os.getpid()}"
            filling.mkdir(mode=0o700)
            try:
                yield filling
                if (filling / INFO).is_file():
                    _sync(filling)
                    with contextlib.suppress(FileNotFoundError):
                        self._discard(directory)
                    filling.rename(directory)
            finally:
                shutil.rmtree(filling, ignore_errors=True)
        finally:
            os.close(lock)

    def _directory(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a template key: {key!r}")
        return self.directory / key

    def _discard(self, directory: Path) -> None:
        """Renamed out of sight first: `get` never returns a template half deleted."""
        hidden = directory.with_name(f".{directory.name}.removing-{os.getpid()}")
        directory.rename(hidden)
        shutil.rmtree(hidden)


def _sync(directory: Path) -> None:
    """The template's data on disk before it appears: after a power cut no template is left
    whose files are short, which every later VM would fail to restore from."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
