"""Migration: a container checkpointed on one containerd restores on another (a second node,
with its own root, state and namespace), for the runsc and the runc shim.

The checkpoint travels as a node would send it: `ctr containers checkpoint --task --rw` makes
an image in the first containerd's content store, `ctr images export` writes it to a file and
`ctr images import` reads it into the second, which restores it with `ctr containers restore
--live --rw`. The base image is already on the second node, as after a pull. Flags every
containerd version needs: `--skip-manifest-json` on export (ctr would read the checkpoint's
blobs as Docker manifests and fail) and `--no-unpack` on import (a checkpoint has no layers to
unpack; the restore uses the base image's snapshot and the checkpoint's rw diff).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from harness import PrivateContainerd, wait_until
from runsc_support import criu_unusable_reason, removing_ctr_fifos, runsc_unusable_reason

pytestmark = [pytest.mark.timeout(240), pytest.mark.checkpoint]

# The count lives in the shell's memory; the file only shows it. A process started afresh
# would write 1, 2, ... over the value the checkpoint's rw diff brought along.
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done"


def count(containerd: PrivateContainerd, name: str) -> int:
    return int(containerd.exec_output(name, "cat", "/tmp/n").strip() or 0)


@pytest.mark.parametrize(
    ("runtime", "unusable_reason"),
    [
        pytest.param("io.containerd.pyrunsc.v1", runsc_unusable_reason, id="runsc"),
        # runc checkpoints with CRIU, which works only where `criu check` passes.
        pytest.param(
            "io.containerd.pyrunc.v1", criu_unusable_reason, id="runc", marks=pytest.mark.criu
        ),
    ],
)
def test_counter_checkpointed_on_one_containerd_goes_on_on_another(
    containerd: PrivateContainerd,
    other_containerd: PrivateContainerd,
    tmp_path: Path,
    runtime: str,
    unusable_reason: Callable[[], str | None],
) -> None:
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)
    source, target = containerd, other_containerd
    name = f"mig-{runtime.split('.')[2]}"
    ref = f"localhost/pyshim-migration/{name}:1"
    archive = tmp_path / "checkpoint.tar"

    source.run_detached(name, "sh", "-c", COUNTER, runtime=runtime)
    try:
        assert wait_until(lambda: count(source, name) >= 20, timeout=30)
        before = count(source, name)
        source.ctr("containers", "checkpoint", "--task", "--rw", name, ref, timeout=120)
        source.ctr("images", "export", "--skip-manifest-json", str(archive), ref, timeout=120)
    finally:
        source.kill_and_delete(name, check=False)
        source.ctr("images", "rm", ref, check=False)
    try:
        target.ctr("images", "import", "--no-unpack", str(archive), timeout=120)
        with removing_ctr_fifos(name):
            target.ctr("containers", "restore", "--live", "--rw", name, ref, timeout=120)
            try:
                assert target.task_status(name) == "RUNNING"
                info = target.ctr("containers", "info", name).stdout
                assert f'"Name": "{runtime}"' in info  # the checkpoint's runtime, not a default
                # Once the process writes again, its count goes on from where it was.
                stale = count(target, name)
                assert wait_until(lambda: count(target, name) != stale, timeout=20)
                assert count(target, name) > before
            finally:
                target.kill_and_delete(name, check=False)
    finally:
        target.ctr("images", "rm", ref, check=False)
