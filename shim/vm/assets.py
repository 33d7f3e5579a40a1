"""Where a node keeps the VM backend's assets, and the fetching of its kernel.

    <root>/kernel/      Debian's generic kernel package unpacked: boot/vmlinuz-R, lib/modules/R
    <root>/images/      the guest images (shim.vm.image)
    <root>/templates/   saved VMs that new VMs restore from (shim.vm.templates)

`pyshim assets` (and `pyshim install`) set them up; shims only read them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from shim.vm.kernel import Kernel

SETUP_COMMAND = "pyshim assets"  # what an error about a missing asset tells the reader to run
KERNEL_METAPACKAGE = "linux-image-amd64"


class AssetError(Exception):
    """An asset could not be fetched: a message for the administrator."""


@dataclass(frozen=True)
class VmAssets:
    DEFAULT_ROOT: ClassVar[Path] = Path("/var/lib/pyshim/vm")

    root: Path

    @property
    def kernel_dir(self) -> Path:
        return self.root / "kernel"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def templates_dir(self) -> Path:
        return self.root / "templates"


def kernel_package() -> str:
    """The ABI's image package (linux-image-6.1.0-N-amd64) that the metapackage depends on:
    the generic kernel has 9p and virtio-fs as modules, the cloud kernel has neither."""
    try:
        depends = subprocess.run(
            ["apt-cache", "depends", KERNEL_METAPACKAGE],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError as exc:
        raise AssetError(f"cannot run apt-cache (the VM's kernel is Debian's): {exc}") from exc
    for line in depends.splitlines():
        kind, _, package = line.strip().partition(": ")
        if kind == "Depends" and package.removeprefix("linux-image-")[:1].isdigit():
            return package
    raise AssetError(f"apt-cache knows no {KERNEL_METAPACKAGE} (run apt-get update)")


def unpacked_kernel(dest: Path, package: str) -> Kernel:
    """Where `package` is (or would be) unpacked under `dest`."""
    release = package.removeprefix("linux-image-")
    return Kernel(dest / "boot" / f"vmlinuz-{release}", dest / "lib" / "modules" / release)


def is_unpacked(kernel: Kernel) -> bool:
    # dpkg-deb -x writes no modules.dep (depmod makes it at install time): modules.order it is.
    return kernel.vmlinuz.is_file() and (kernel.modules_dir / "modules.order").is_file()


def fetch_kernel(dest: Path) -> Kernel:
    """The current Debian kernel unpacked under `dest`: downloaded with `apt-get download` and
    unpacked with `dpkg-deb -x` (nothing is installed system-wide) unless it is there already.
    A previous kernel there is replaced whole, by a rename: a VM booting meanwhile reads one
    kernel or the other, never a mix."""
    package = kernel_package()
    kernel = unpacked_kernel(dest, package)
    if is_unpacked(kernel):
        return kernel
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyshim-kernel.") as download:
        _run(["apt-get", "-q", "download", package], f"apt-get download {package}", download)
        (deb,) = Path(download).glob(f"{package}_*.deb")
        # Unpacked next to dest, so that the renames below stay on one filesystem.
        unpacked = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        old = unpacked.with_name(unpacked.name + ".old")
        try:
            _run(["dpkg-deb", "-x", str(deb), str(unpacked)], f"dpkg-deb -x {deb.name}")
            if not unpacked_kernel(unpacked, package).vmlinuz.is_file():
                raise AssetError(f"{package} has no {kernel.vmlinuz.relative_to(dest)}")
            os.chmod(unpacked, 0o755)  # mkdtemp made it 0700; the package's own dirs are 0755
            if dest.exists():
                dest.rename(old)
            unpacked.rename(dest)
        finally:
            for leftover in (unpacked, old):
                shutil.rmtree(leftover, ignore_errors=True)
    return kernel


def _run(argv: list[str], what: str, cwd: str | None = None) -> None:
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise AssetError(f"{what}: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise AssetError(f"{what} failed: {tail}")
