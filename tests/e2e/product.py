"""pykata as users install it: the checkout installed non-editable in <repo>/var/product (its
own venv), with the VM's assets (`pyshim assets`) in <repo>/var/vm-assets.

`product_install()` makes the venv once, reinstalls the package whenever the checkout's sources
differ from what was installed (a content hash kept in the venv), and runs the product's
`pyshim assets` (idempotent: quick when nothing changed, and it rebuilds the guest image after
any change to the agent's code). A file lock serializes concurrent pytest processes. Standard
library only: scripts/setup runs it as a script, scripts/bench imports it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRODUCT = REPO / "var" / "product"
PRODUCT_BIN = PRODUCT / "bin"
ASSETS_DIR = REPO / "var" / "vm-assets"
LOCK = REPO / "var" / "product.lock"
SOURCE_KEY = PRODUCT / "pyshim-source.sha256"  # the installed sources' key, after an install
TOOLS_DONE = PRODUCT / "pyshim-build-tools"  # the venv is complete: build tools installed
BASE_PYTHON = "/usr/bin/python3"  # as scripts/setup makes .venv
# pyproject.toml's build requirements, in the venv itself: a reinstall with
# --no-build-isolation skips making a build environment (~6 s -> ~3 s).
BUILD_TOOLS = ["setuptools>=66", "wheel", "cffi>=1.15"]
PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]
PACKAGE_FILES = ["pyproject.toml", "setup.py", "README.md"]  # README.md: the readme metadata
# What an editable install builds in the checkout: not sources (cffi's C, objects, modules).
BUILT = ("*.pyc", "*.so", "*.o", "_native.c")
INSTALL_TIMEOUT = 600
ASSETS_TIMEOUT = 1800  # a kernel download and a guest image build on a busy machine


class ProductError(Exception):
    """The product could not be installed: the checkout does not build or install."""


class AssetsError(ProductError):
    """The product's `pyshim assets` failed (no kernel to fetch, no mkfs.erofs, ...)."""


def say(message: str) -> None:
    print(f"product: {message}", file=sys.stderr, flush=True)


def package_sources(root: Path) -> Iterator[Path]:
    """The files the install is made of, relative to root, in a fixed order: the packaging
    files and the package's tree (*.py, the launcher's *.c, the *.pyi stubs pip installs too)."""
    found = [root / name for name in PACKAGE_FILES] + sorted((root / "shim").rglob("*"))
    for path in found:
        built = any(path.match(pattern) for pattern in BUILT)
        if path.is_file() and not built and "__pycache__" not in path.parts:
            yield path.relative_to(root)


def source_key(root: Path) -> str:
    """SHA-256 over the package's sources under root: each path and its content."""
    digest = hashlib.sha256()
    for relative in package_sources(root):
        content = (root / relative).read_bytes()
        digest.update(f"{relative}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def _run(argv: list[str], what: str, timeout: float, error: type[ProductError]) -> str:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{what}: {exc}") from exc
    if result.returncode != 0:
        raise error(f"{what} exited {result.returncode}:\n{result.stderr.strip() or result.stdout}")
    return result.stdout


def _ensure_venv() -> None:
    if (PRODUCT / "bin" / "python").exists() and TOOLS_DONE.exists():
        return
    began = time.monotonic()
    say(f"creating the venv {PRODUCT} (with {', '.join(BUILD_TOOLS)})")
    SOURCE_KEY.unlink(missing_ok=True)
    _run([BASE_PYTHON, "-m", "venv", "--clear", str(PRODUCT)], "python3 -m venv", 300, ProductError)
    python = str(PRODUCT / "bin" / "python")
    _run([python, *PIP, *BUILD_TOOLS], "pip install the build tools", 300, ProductError)
    TOOLS_DONE.touch()
    say(f"venv ready in {time.monotonic() - began:.1f} s")


def _copy_sources(dest: Path) -> None:
    """The package's sources as a clean tree: the build then never reuses the checkout's
    build/ (shared with the editable install, and build_py never drops a deleted module)."""
    for relative in package_sources(REPO):
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / relative, target)


def _ensure_installed() -> None:
    """pip install of a copy of the checkout unless the installed sources have its key. pip
    always reinstalls a local directory's project, and installs a dependency it lacks (a
    pyproject.toml that gained one), so no --force-reinstall or --no-deps is needed."""
    with tempfile.TemporaryDirectory(prefix="pyshim-product-src.") as scratch:
        source = Path(scratch)
        _copy_sources(source)
        key = source_key(source)  # of what is installed, even if the checkout changes meanwhile
        installed = SOURCE_KEY.read_text().strip() if SOURCE_KEY.exists() else ""
        if installed == key:
            return
        began = time.monotonic()
        why = "sources changed" if installed else "first install"
        say(f"installing the checkout into {PRODUCT} (non-editable; {why})")
        SOURCE_KEY.unlink(missing_ok=True)
        python = str(PRODUCT / "bin" / "python")
        argv = [python, *PIP, "--no-build-isolation", str(source)]
        _run(argv, f"pip install {REPO} into {PRODUCT}", INSTALL_TIMEOUT, ProductError)
        SOURCE_KEY.write_text(key + "\n")
        say(f"installed in {time.monotonic() - began:.1f} s")


def run_assets(pyshim: Path, assets_dir: Path) -> str:
    """`pyshim assets --assets-dir DIR` of an installed pyshim; its report (AssetsError with
    its stderr if it fails)."""
    began = time.monotonic()
    argv = [str(pyshim), "assets", "--assets-dir", str(assets_dir)]
    report = _run(argv, " ".join(argv), ASSETS_TIMEOUT, AssetsError).strip()
    took = time.monotonic() - began
    if not report.endswith("nothing changed"):  # up to date: every line "unchanged: ..."
        say(f"{' '.join(argv[1:])} ({took:.1f} s):\n  " + report.replace("\n", "\n  "))
    return report


@functools.cache
def product_install() -> Path:
    """The bin dir of var/product, with the checkout installed and its VM assets ready in
    ASSETS_DIR; ProductError (AssetsError for `pyshim assets`) with the tool's output."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released with the file: another pytest waits
        _ensure_venv()
        _ensure_installed()
        run_assets(PRODUCT_BIN / "pyshim", ASSETS_DIR)
    return PRODUCT_BIN


def pykata_toml(assets_dir: Path) -> str:
    """A pykata config (the runtime options' ConfigPath) for the VM assets in assets_dir."""
    return f"[vm]\nassets_dir = {json.dumps(str(assets_dir))}\n"  # a JSON string is a TOML one


if __name__ == "__main__":  # scripts/setup
    try:
        print(f"product: ready in {product_install()}")
    except ProductError as error:
        sys.exit(f"product: {error}")
