"""Migration: a container checkpointed on one containerd restores on another (a second node,
with its own root, state and namespace), for the runsc and the runc shim.

The checkpoint travels as a node would send it: `ctr containers checkpoint --task --rw` makes
an image in the first containerd's content store, `ctr images export` writes it to a file and
`ctr images import` reads it into the second, which restores it with `ctr containers restore
--live --rw`. The base image is already on the second node, as after a pull. Flags every
containerd version needs: `--skip-manifest-json` on export (ctr would read the checkpoint's
blobs as Docker manifests and fail) and `--no-unpack` on import (a checkpoint has no layers to
unpack; the restore uses the base image's snapshot and the checkpoint's rw diff); 1.7 and 2.x
also `--local` on export (export_flags).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from counter_workload import COUNTER, count, shown
from harness import PrivateContainerd, wait_until
from runsc_support import criu_unusable_reason, removing_ctr_fifos, runsc_unusable_reason

pytestmark = [pytest.mark.timeout(240), pytest.mark.checkpoint]


def export_flags(containerd: PrivateContainerd) -> list[str]:
    """ctr 1.7 and 2.x export through the transfer service unless --local, and then may exit
    before the goroutine that writes the stream to the file has finished: a truncated archive
    (seen under load: "short read" at import)."""
    return ["--skip-manifest-json", *([] if containerd.version == "1.6" else ["--local"])]


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

    source.run_detached(name, *COUNTER, runtime=runtime)
    try:
        assert wait_until(lambda: count(source, name) >= 20, timeout=30)
        token, before = shown(source, name)
        source.ctr("containers", "checkpoint", "--task", "--rw", name, ref, timeout=120)
        source.ctr("images", "export", *export_flags(source), str(archive), ref, timeout=120)
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
                # Once the process writes again: the same process, its count going on.
                stale = shown(target, name)
                assert wait_until(lambda: shown(target, name) != stale, timeout=20)
                restored_token, after = shown(target, name)
                assert restored_token == token
                assert after > before
            finally:
                target.kill_and_delete(name, check=False)
    finally:
        target.ctr("images", "rm", ref, check=False)
