"""pyrunsc's spec: a non-recursive read-only volume keeps the host mounts below it as binds of
their own, since runsc would serve them as one read-only file system with it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.runtimes import runsc_spec


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a writable tmpfs at `tmp` and a read-only one at `tmp/ro`."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    source = tmp_path / "volume"
    (source / "tmp").mkdir(parents=True)
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", source / "tmp"], check=True)
        mounted.append(source / "tmp")
        (source / "tmp" / "ro").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", source / "tmp/ro"], check=True)
        mounted.append(source / "tmp/ro")
        yield source
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", point], check=True)


def bind(source: Path, destination: str, *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": str(source),
            "options": list(options)}  # fmt: skip


def test_a_read_only_rbind_gets_a_bind_per_host_mount_below_it(volume: Path) -> None:
    spec = {"mounts": [bind(volume, "/vol", "rbind", "rprivate", "ro"),
                       {"destination": "/run", "type": "tmpfs", "source": "tmpfs"}]}  # fmt: skip
    assert runsc_spec.submount_binds(spec)
    assert spec["mounts"] == [
        bind(volume, "/vol", "rbind", "rprivate", "ro"),
        bind(volume / "tmp", "/vol/tmp", "bind", "rprivate", "rw"),
        bind(volume / "tmp/ro", "/vol/tmp/ro", "bind", "rprivate", "ro"),
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs"},
    ]


@pytest.mark.parametrize(
    "options",
    [("rbind", "rw"), ("bind", "ro"), ("rbind", "rro")],
    ids=["writable", "plain-bind", "recursive-read-only"],
)
def test_other_binds_are_left_alone(volume: Path, options: tuple[str, ...]) -> None:
    spec = {"mounts": [bind(volume, "/vol", *options)]}
    assert not runsc_spec.submount_binds(spec)
    assert spec["mounts"] == [bind(volume, "/vol", *options)]
