"""Fixtures for the docker tests: one private containerd (PYSHIM_CONTAINERD) and one private
dockerd on it per session, with the busybox image loaded, driven with the docker CLI as a user
drives it.

After every test the autouse `clean_docker` removes every container (`docker rm -f`) and fails
the test if a shim process, a mount or one of dockerd's FIFO dirs outlived them.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from dockerd import PrivateDockerd, docker_unusable_reason
from harness import IMAGE_TAR, HarnessError, PrivateContainerd
from session import fail_if_left, private_containerd
from wasm_image import build_image, wasm_build_unusable_reason


@pytest.fixture(scope="session")
def containerd() -> Iterator[PrivateContainerd]:
    missing = docker_unusable_reason()  # a setup step not done, not a machine's limit
    if missing:
        pytest.fail(missing, pytrace=False)
    yield from private_containerd()


@pytest.fixture(scope="session")
def dockerd(containerd: PrivateContainerd) -> Iterator[PrivateDockerd]:
    try:
        with PrivateDockerd(containerd) as private:
            private.docker("load", "-i", str(IMAGE_TAR), timeout=120)
            yield private
    except HarnessError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def wasm_image(dockerd: PrivateDockerd, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The WASI test programs' image (tests/e2e/wasm), loaded into dockerd."""
    reason = wasm_build_unusable_reason()
    if reason:
        pytest.skip(reason)
    dockerd.docker("load", "-i", str(build_image(tmp_path_factory.mktemp("wasm"))), timeout=120)


def fifo_dirs(dockerd: PrivateDockerd) -> list[Path]:
    fifo_root = dockerd.exec_root / "containerd"
    return sorted(fifo_root.iterdir()) if fifo_root.is_dir() else []


def leftovers(containerd: PrivateContainerd, dockerd: PrivateDockerd) -> list[str]:
    idle = {f"mount {point}" for point in dockerd.idle_mounts}
    found = [problem for problem in containerd.leftovers() if problem not in idle]
    return found + [f"docker FIFO dir {d}" for d in fifo_dirs(dockerd)] + dockerd.bridge.leftovers()


def force_clean(containerd: PrivateContainerd, dockerd: PrivateDockerd) -> None:
    containerd.force_clean()
    for directory in fifo_dirs(dockerd):
        shutil.rmtree(directory, ignore_errors=True)
    dockerd.bridge.force_clean()


@pytest.fixture(autouse=True)
def clean_docker(containerd: PrivateContainerd, dockerd: PrivateDockerd) -> Iterator[None]:
    yield
    dockerd.remove_all()
    fail_if_left(
        lambda: leftovers(containerd, dockerd), lambda: force_clean(containerd, dockerd), timeout=15
    )
