"""Fixtures for the CRI tests: one private containerd per session with the CRI plugin and the
handlers `pyshim install` registers (plus `runc`, containerd's own shim, as the reference),
driven through the CRI gRPC API as the kubelet drives it.

After every test the autouse `clean_pods` removes every pod, as a kubelet draining the node,
and fails the test if a shim process, a mount, runsc state or anything of a pod's network (its
netns, its veth on the session's bridge, its address lease) outlived them.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from cri_client import CriClient, cri_client
from harness import PrivateContainerd, detach_mounts
from runsc_support import RUNSC_ROOT
from session import fail_if_left, private_containerd
from wasm_image import IMAGE as WASM_IMAGE
from wasm_image import build_image, wasm_build_unusable_reason


@pytest.fixture(scope="session")
def containerd() -> Iterator[PrivateContainerd]:
    yield from private_containerd(cri=True)


@pytest.fixture(scope="session")
def cri(containerd: PrivateContainerd) -> Iterator[CriClient]:
    with cri_client(containerd) as client:
        yield client


def runsc_state(containerd: PrivateContainerd, cri: CriClient) -> list[Path]:
    """runsc's state files of the test's pods and containers (runsc names them by id)."""
    root = RUNSC_ROOT / containerd.namespace
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if any(i in p.name for i in cri.created)]


@pytest.fixture(scope="session")
def wasm_image(containerd: PrivateContainerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The WASI test programs' image (tests/e2e/wasm), in the CRI namespace; its name."""
    reason = wasm_build_unusable_reason()
    if reason:
        pytest.skip(reason)
    containerd.ctr("images", "import", str(build_image(tmp_path_factory.mktemp("wasm"))))
    return WASM_IMAGE


@pytest.fixture(autouse=True)
def clean_pods(containerd: PrivateContainerd, cri: CriClient) -> Iterator[None]:
    yield
    cri.remove_all()

    def leftovers() -> list[str]:
        state = [f"runsc state {path}" for path in runsc_state(containerd, cri)]
        netns = [f"network namespace {path}" for path in cri.netns_left()]
        return containerd.leftovers() + state + netns

    def force_clean() -> None:
        containerd.force_clean()  # its sandboxes are killed with the run's cgroups at the end
        for path in runsc_state(containerd, cri):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for path in cri.netns_left():  # containerd's bind mount of the netns, then its file
            detach_mounts([path])
            path.unlink(missing_ok=True)

    fail_if_left(leftovers, force_clean, timeout=10)
