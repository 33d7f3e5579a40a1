"""pykata installed as a user installs it: a fresh venv, `pip install <repo>` (not editable),
`pyshim install --dry-run` planning the VM's assets, `pyshim assets` building them, and a
containerd that runs a pykata container from that venv on those assets.

Everything lives in one temp dir (the venv, the install's paths, the assets), removed at the
end with the containerd and its VM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import DEFAULT_VERSION, PYKATA_RUNTIME, REPO, PrivateContainerd, binaries
from product import ASSETS_DIR, BASE_PYTHON
from vm_support import require_vm

from shim.kata.vm import accel_cache
from shim.vm.kernel import find_kernel

BOOT = 300  # seconds for the first VM of fresh assets: its template is booted and saved first
INSTALL = 600  # pip install with a build environment (pip's cache has the wheels)

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module", autouse=True)
def vm_capable() -> None:
    require_vm()  # and the product's assets: their kernel seeds this test's (below)


@pytest.fixture
def work() -> Iterator[Path]:
    """A temp dir on the filesystem of the product's assets (the kernel is hard-linked)."""
    path = Path(tempfile.mkdtemp(prefix="kata-install-", dir=ASSETS_DIR.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(argv: list[str | Path], timeout: float) -> str:
    """stdout of a command; the test fails with its output if it exits non-zero."""
    result = subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    command = " ".join(map(str, argv))
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def seed_kernel(source: Path, dest: Path) -> None:
    """The unpacked kernel package, hard-linked: to save CI a download (fetching it is what
    scripts/setup's `pyshim assets` run does). Not its PVH image: this pyshim writes that.
    Safe to share: pyshim replaces asset files by rename, never writes into one."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link, ignore=shutil.ignore_patterns("vmlinux-*"))


def test_fresh_venv_installs_plans_builds_and_runs_a_pykata_container(work: Path) -> None:
    venv = work / "venv"
    run([BASE_PYTHON, "-m", "venv", venv], timeout=300)
    # As users do: the checkout, not editable, with pip's build isolation.
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", REPO], timeout=INSTALL)
    pyshim = venv / "bin" / "pyshim"
    assets, etc = work / "assets", work / "etc"
    pykata_config = etc / "pykata.toml"
    etc.mkdir()  # a node's main config, importing the drop-in dir
    (etc / "config.toml").write_text(f'version = 2\nimports = ["{etc / "conf.d"}/*.toml"]\n')

    paths = ["--config", etc / "config.toml", "--drop-in-dir", etc / "conf.d"]
    paths += ["--bin-dir", work / "bin", "--runsc-config", etc / "runsc.toml"]
    paths += ["--pykata-config", pykata_config, "--assets-dir", assets]
    containerd = binaries(DEFAULT_VERSION).containerd
    plan = run([pyshim, "install", "--dry-run", "--containerd", containerd, *paths], timeout=120)
    planned = [line for line in plan.splitlines() if line.startswith("would ")]
    assert any("fetch kernel" in line and str(assets / "kernel") in line for line in planned), plan
    assert any("guest image" in line for line in planned), plan
    assert any(str(pykata_config) in line for line in planned), plan
    assert f'assets_dir = "{assets}"' in plan  # the pykata.toml it would write
    assert f"{work / 'bin'}/containerd-shim-pykata-v1 -> {venv / 'bin'}" in plan
    assert sorted(os.listdir(work)) == ["etc", "venv"], "a dry run changed something"
    assert os.listdir(etc) == ["config.toml"], "a dry run changed something"

    seed_kernel(ASSETS_DIR / "kernel", assets / "kernel")
    report = run([pyshim, "assets", "--assets-dir", assets], timeout=900)
    assert "unchanged: kernel" in report, report  # the seeded one
    assert "built guest image" in report, report
    assert list((assets / "images").glob("*.erofs")), report
    again = run([pyshim, "assets", "--assets-dir", assets], timeout=300)
    assert again.splitlines()[-1] == "nothing changed", again

    # The VM's accelerator, probed once per kernel path: this kernel is the product's (hard
    # links), so the product's answer stands (a KVM probe that hangs takes 20 s).
    accel = accel_cache(find_kernel(assets / "kernel"))
    product_accel = accel_cache(find_kernel(ASSETS_DIR / "kernel"))
    if product_accel.is_file():
        shutil.copyfile(product_accel, accel)
    try:
        with PrivateContainerd(pykata_bin=venv / "bin", vm_assets=assets) as ctrd:
            shim = ctrd.base / "bin" / "containerd-shim-pykata-v1"
            assert shim.resolve() == (venv / "bin" / shim.name).resolve()
            result = ctrd.ctr(
                "run", "--rm", "--runtime", PYKATA_RUNTIME, ctrd.image, "kata-installed",
                "echo", "hello from the installed pykata", timeout=BOOT, check=False,
            )  # fmt: skip
            assert (result.returncode, result.stdout) == (
                0,
                "hello from the installed pykata\n",
            ), f"{result.stderr}\ncontainerd log:\n{ctrd.log_tail()}"
            ctrd.settle()
            assert not ctrd.leftovers()
        assert list((assets / "templates").iterdir()), "the first VM made no template"
    finally:
        accel.unlink(missing_ok=True)
