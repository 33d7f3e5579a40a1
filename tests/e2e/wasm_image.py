"""The WASI test programs (tests/e2e/wasm/*.c, compiled here with clang and wasi-libc) and the
OCI image that holds them; used by test_wasm_shim.py and scripts/bench. Standard library only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from harness import REPO, run

IMAGE = "localhost/pyshim/wasm-tests:latest"
SOURCES = Path(__file__).parent / "wasm"
WASI_SYSROOT = Path("/usr/include/wasm32-wasi")
GREETING = "greetings from the rootfs\n"
PREBUILT_VARIABLE = "PYSHIM_WASM_TEST_IMAGE"


def wasm_build_unusable_reason() -> str | None:
    """Why the programs cannot be built here, or None if they can."""
    if shutil.which("clang") is None or not WASI_SYSROOT.is_dir():
        return "clang with wasi-libc is not installed (scripts/setup installs them)"
    return None


def build_programs(out: Path) -> list[str]:
    """Compile every tests/e2e/wasm/*.c to out/<name>.wasm; `--add` arguments for the image."""
    adds = []
    for source in sorted(SOURCES.glob("*.c")):
        target = out / f"{source.stem}.wasm"
        argv = ["clang", "--target=wasm32-wasi", "-O2", "-Wall", "-Werror", "-Wl,--strip-all"]
        run([*argv, "-o", str(target), str(source)], timeout=60)
        adds.append(f"--add=/{target.name}={target}")
    return adds


def build_image(work: Path) -> Path:
    """Build the programs and the image IMAGE (with /data/greeting.txt) in work; its tar.
    PREBUILT_VARIABLE names a tar built earlier (scripts/vm-test builds it on the host: clang
    takes minutes under emulation)."""
    prebuilt = os.environ.get(PREBUILT_VARIABLE)
    if prebuilt:
        return Path(prebuilt)
    greeting = work / "greeting.txt"
    greeting.write_text(GREETING)
    image = work / "wasm-tests.tar"
    build = [str(REPO / "scripts" / "build-image"), "--ref", IMAGE, "--cmd", "/hello.wasm"]
    build += [*build_programs(work), f"--add=/data/greeting.txt={greeting}", str(image)]
    run(build, timeout=60)
    return image
