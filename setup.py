"""The compiled parts, built at install time: the cffi helper, and the native shim launcher
installed as each containerd-shim-py*-v1 (without a C compiler those are Python console
scripts instead). Everything else is in pyproject.toml."""

import os
import sys
from pathlib import Path

# isort: off
from setuptools import setup  # first: its distutils then stands in for the standard library's
from distutils.command.build_scripts import build_scripts

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package is not installed yet
from shim.native.build import build_launchers

SHIMS = [
    "containerd-shim-pyrunc-v1",
    "containerd-shim-pyrunsc-v1",
    "containerd-shim-pywasm-v1",
    "containerd-shim-pykata-v1",
]


class CopyExecutables(build_scripts):
    """Copies the launchers as they are (setuptools reads a script as text, to fix a shebang)."""

    def copy_scripts(self) -> tuple[list[str], list[str]]:
        self.mkpath(self.build_dir)
        copied = [os.path.join(self.build_dir, os.path.basename(path)) for path in self.scripts]
        for path, target in zip(self.scripts, copied, strict=True):
            self.copy_file(path, target)
        return copied, copied


# The launcher's fallback: it execs this with its own argv[0] as the first argument.
entry_points = ["pyshim = shim.install:main", "pyshim-shim = shim.main:launched"]
launchers = build_launchers(Path("build", "launcher"), SHIMS)
if launchers is None:
    entry_points += [f"{name} = shim.main:main" for name in SHIMS]

setup(
    cffi_modules=["shim/sys/native_build.py:ffibuilder"],
    entry_points={"console_scripts": entry_points},
    scripts=launchers or [],
    cmdclass={"build_scripts": CopyExecutables},
)
