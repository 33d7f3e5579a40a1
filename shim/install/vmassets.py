"""The VM backend's assets as install steps (`pyshim assets`, and the end of `pyshim install`):
the kernel, its PVH image and the guest image, each fetched or built unless it is there."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from shim.install.errors import InstallError
from shim.install.steps import Step
from shim.kata import pvh
from shim.vm import assets, image
from shim.vm.assets import VmAssets
from shim.vm.kernel import Kernel
from shim.vm.templates import TemplateStore


def plan_assets(vm: VmAssets) -> list[Step]:
    with _reported("find the VM's kernel"):
        package = assets.kernel_package()
    kernel = assets.unpacked_kernel(vm.kernel_dir, package)
    where = f"{kernel.release} in {vm.kernel_dir}"
    present = assets.is_unpacked(kernel)

    def fetch() -> None:
        assets.fetch_kernel(vm.kernel_dir)

    def write_elf() -> None:
        pvh.write(kernel)

    if present:
        steps = [Step(f"unchanged: kernel {where}")]
    else:
        todo = f"fetch kernel {where} (apt-get download {package}, dpkg-deb -x)"
        steps = [_step(todo, f"fetched kernel {where}", fetch, vm.kernel_dir)]
    elf = pvh.image_path(kernel)
    if pvh.written(kernel):
        steps.append(Step(f"unchanged: the kernel's PVH image {elf}"))
    else:
        what = f"the kernel's uncompressed PVH image {elf}"
        steps.append(_step(f"write {what}", f"wrote {what}", write_elf, elf))
    steps.append(_image_step(vm, kernel, fetched=not present))
    return steps


def _image_step(vm: VmAssets, kernel: Kernel, fetched: bool) -> Step:
    def build() -> str:
        built = image.build_image(vm.images_dir, kernel)
        stale = image.remove_stale_images(vm.images_dir, built)
        # A template holds a booted guest of one image: of no use with another.
        store = TemplateStore(vm.templates_dir)
        outdated = [t.key for t in store.list() if t.info.get("image") != built.key]
        for key in outdated:
            store.remove(key)
        removed = f", removed {len(stale)} stale" if stale else ""
        removed += f", removed {len(outdated)} outdated templates" if outdated else ""
        return f"built guest image {built.key} in {vm.images_dir}{removed}"

    if fetched:  # the key hashes the kernel's files
        return _step(f"build the guest image for kernel {kernel.release}", "", build, vm.images_dir)
    key = _image_key(vm, kernel)
    current = image.current_image(vm.images_dir)
    if current is not None and current.key == key:
        return Step(f"unchanged: guest image {key} up to date")
    return _step(f"build guest image {key} in {vm.images_dir}", "", build, vm.images_dir)


def _image_key(vm: VmAssets, kernel: Kernel) -> str:
    """image_key caches the agent's imports in the directory it is given: planning gives it a
    scratch copy of build_image's cache, so that it writes nothing (and stays fast)."""
    with tempfile.TemporaryDirectory(prefix="pyshim-plan.") as scratch:
        with contextlib.suppress(FileNotFoundError):
            shutil.copy(vm.images_dir / image.CLOSURE_CACHE, scratch)
        with _reported("compute the guest image's key"):
            return image.image_key(kernel, cache_dir=Path(scratch))


def _step(todo: str, done: str, run: Callable[[], str | None], writes: Path) -> Step:
    def reported() -> str | None:
        with _reported(todo):
            return run()

    return Step(todo, done, reported, (writes,))


@contextlib.contextmanager
def _reported(what: str) -> Iterator[None]:
    """The assets' failures as messages: a missing tool or package, a failed command."""
    try:
        yield
    except (assets.AssetError, OSError, RuntimeError, ValueError) as exc:
        raise InstallError(f"could not {what}: {exc}") from exc
    except subprocess.CalledProcessError as exc:
        output = (exc.stderr or exc.stdout or b"").strip()
        text = output.decode(errors="replace") if isinstance(output, bytes) else output
        raise InstallError(f"could not {what}: {exc}: {text[-500:]}") from exc


def plan_removal(vm: VmAssets, purge: bool) -> list[Step]:
    """Uninstall's step for the assets: a note that they stay, or with `purge` their removal
    (what pyshim put there only: the root itself goes only if nothing else is left in it)."""
    ours = [vm.kernel_dir, vm.images_dir, vm.templates_dir]
    if not any(path.exists() for path in ours):
        return [Step(f"unchanged: no VM assets in {vm.root}")]
    if not purge:
        return [Step(f"left in place: the VM assets in {vm.root} (--purge-vm-assets removes them)")]

    def remove() -> None:
        for path in filter(Path.exists, ours):
            shutil.rmtree(path)
        with contextlib.suppress(OSError):
            vm.root.rmdir()

    return [
        Step(
            f"remove the VM assets in {vm.root}",
            f"removed the VM assets in {vm.root}",
            remove,
            tuple(ours),
        )
    ]
