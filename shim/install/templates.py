"""`pyshim templates list | remove`: the VM templates a node keeps (shim.vm.templates)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from typing import TextIO

from shim.install.errors import InstallError
from shim.vm.templates import Template, TemplateStore

HEADER = ("KEY", "SIZE", "ACCEL", "CREATED", "DISK")


def list_templates(store: TemplateStore, out: TextIO) -> None:
    templates = store.list()
    if not templates:
        print(f"no templates in {store.directory}", file=out)
        return
    rows = [HEADER, *map(_row, templates)]
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip(), file=out)


def remove_templates(store: TemplateStore, keys: Sequence[str], out: TextIO) -> None:
    """Removes `keys` (every template if empty); InstallError naming the keys it did not find."""
    if not keys:
        removed = store.remove_all()
        print("\n".join(f"removed template {key}" for key in removed) or "no templates", file=out)
        return
    missing = []
    for key in keys:
        try:
            found = store.remove(key)
        except ValueError as exc:  # not a key: never a path to delete
            raise InstallError(str(exc)) from exc
        if found:
            print(f"removed template {key}", file=out)
        else:
            missing.append(key)
    if missing:
        raise InstallError(f"no template {', '.join(missing)} in {store.directory}")


def _row(template: Template) -> tuple[str, str, str, str, str]:
    info = template.info
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("created", 0)))
    size = f"{info.get('vcpus', '?')} vCPU/{info.get('memory_mb', '?')} MB"
    return (template.key, size, str(info.get("accel", "?")), created, _bytes(_disk_use(template)))


def _disk_use(template: Template) -> int:
    """The blocks its files take: the memory file is sparse where the guest never wrote."""
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile
        return sum(os.lstat(path).st_blocks * 512 for path in template.directory.iterdir())
    return 0


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
