"""Checkpoint and restore through the Task API, for the runsc and the runc shim.

The flow is the one ctr 1.6.20 can restore (PROTOCOL P): `ctr containers checkpoint --task`,
remove the task and container, `ctr containers restore --live`. Both with --rw: gVisor's
restore looks for the mount points it made in the old rootfs (e.g. /run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from harness import PrivateContainerd, wait_until
from runsc_support import criu_unusable_reason, removing_ctr_fifos, runsc_unusable_reason

pytestmark = [pytest.mark.timeout(180), pytest.mark.checkpoint]

COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done"


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
def test_restored_counter_goes_on_from_where_it_was(
    containerd: PrivateContainerd, runtime: str, unusable_reason: Callable[[], str | None]
) -> None:
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)
    name = f"ck-{runtime.split('.')[2]}"
    ref = f"localhost/pyshim-checkpoint/{name}:1"

    def count() -> int:
        return int(containerd.exec_output(name, "cat", "/tmp/n").strip() or 0)

    containerd.run_detached(name, "sh", "-c", COUNTER, runtime=runtime)
    try:
        assert wait_until(lambda: count() >= 20, timeout=30)
        before = count()
        containerd.ctr("containers", "checkpoint", "--task", "--rw", name, ref, timeout=120)
    finally:
        containerd.kill_and_delete(name, check=False)
    try:
        with removing_ctr_fifos(name):
            containerd.ctr("containers", "restore", "--live", "--rw", name, ref, timeout=120)
            try:
                assert containerd.task_status(name) == "RUNNING"
                restored = count()
                # A counter started afresh would be back near 1.
                assert restored >= before
                assert wait_until(lambda: count() > restored, timeout=20)
            finally:
                containerd.kill_and_delete(name, check=False)
    finally:
        containerd.ctr("images", "rm", ref, check=False)
