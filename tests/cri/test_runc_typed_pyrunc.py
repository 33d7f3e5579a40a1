"""pyrunc as a handler of runtime_type io.containerd.runc.v2 whose runtime_path is pyrunc's shim
(the harness's RUNC_TYPED_PYRUNC, on containerd 2.x). 2.x introspects a handler's features
(recursive read-only mounts) only for that runtime type, so a handler of pyrunc's own type
never has them and critest skips its recursive read-only specs; declared this way, pyrunc's
handler reports what runc's reports and its containers get recursive read-only volumes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as api
from cri_client import CriClient
from harness import RUNC_TYPED_PYRUNC, PrivateContainerd, process_args

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def introspecting_containerd(containerd: PrivateContainerd) -> None:
    if containerd.version.startswith("1."):
        pytest.skip(f"containerd {containerd.version} introspects no runtime handler features")


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a tmpfs mounted at its `tmpfs`."""
    (tmp_path / "volume" / "tmpfs").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", tmp_path / "volume" / "tmpfs"], check=True)
    try:
        yield tmp_path / "volume"
    finally:
        subprocess.run(["umount", "-l", tmp_path / "volume" / "tmpfs"], check=True)


def handler_features(cri: CriClient) -> dict[str, api.RuntimeHandlerFeatures]:
    status = cri.call("Status", api.StatusRequest())
    return {handler.name: handler.features for handler in status.runtime_handlers}


def test_a_runc_typed_pyrunc_handler_reports_and_gives_recursive_read_only_mounts(
    cri: CriClient, containerd: PrivateContainerd, volume: Path
) -> None:
    features = handler_features(cri)
    assert features[RUNC_TYPED_PYRUNC] == features["runc"]
    assert features[RUNC_TYPED_PYRUNC].recursive_read_only_mounts
    assert not features["pyrunc"].recursive_read_only_mounts  # the reason for such a handler

    recursive = api.Mount(
        container_path="/vol",
        host_path=str(volume),
        readonly=True,
        recursive_read_only=True,
        propagation=api.MountPropagation.PROPAGATION_PRIVATE,
    )
    try:
        pod = cri.run_pod(RUNC_TYPED_PYRUNC)
        container = cri.run_container(pod, containerd.image, ["sleep", "1000"], mounts=[recursive])
        for directory in ("/vol", "/vol/tmpfs"):
            result = cri.exec_sync(container, ["touch", f"{directory}/written"])
            assert result.exit_code != 0, directory
            assert b"Read-only file system" in result.stderr, result.stderr
        shims = [process_args(pid)[0] for pid in containerd.shim_pids()]
        assert shims, "no shim serves the pod"
        served_by = {Path(arg).name for argv in shims for arg in argv[:3]}
        assert "containerd-shim-pyrunc-v1" in served_by, shims
        assert "containerd-shim-runc-v2" not in served_by, shims
    finally:
        cri.remove_all()  # before the fixture unmounts the host's tmpfs
