"""A daemon's mount namespace of its own (pykata's): the host's mounts reach it where they are
shared, its mounts never reach the host, and a host path is bound as the host sees it now,
mounts the host made later on private mounts included. Run in a fork: the namespace is for
the process."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.sys.mount import attach_tree, clone_tree, detach, mounts_under
from shim.sys.namespaces import enter_private_mounts, in_host_mounts


def tmpfs(target: Path, *options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target), *options], check=True)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """`shared`: a tmpfs whose mounts propagate (a systemd host's /); `private`: one whose
    mounts do not (this machine's /)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount namespaces)")
    tmpfs(tmp_path / "shared", "--make-shared")
    tmpfs(tmp_path / "private", "--make-private")
    yield tmp_path
    for point in mounts_under(str(tmp_path)):
        detach(point)


def in_private_child(
    host_step: Callable[[], None], work: Callable[[], Any], host_look: Callable[[], Any]
) -> tuple[Any, Any]:
    """A forked child enters a private mount namespace, the host does ``host_step()``, the
    child ``work()``, and the host ``host_look()`` while the child's mounts are still in
    place: the two results."""
    results_r, results_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(results_r)
            os.close(go_w)
            enter_private_mounts()
            os.write(results_w, b"entered\n")
            os.read(go_r, 1)  # the host's step is done
            os.write(results_w, json.dumps(work()).encode() + b"\n")
            os.read(go_r, 1)  # the host looked
            code = 0
        finally:
            os._exit(code)
    os.close(results_w)
    os.close(go_r)
    with os.fdopen(results_r) as results, os.fdopen(go_w, "w") as go:
        assert results.readline() == "entered\n"
        host_step()
        go.write("x")
        go.flush()
        line = results.readline()
        assert line, "the child failed"
        looked = host_look()
        go.write("x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(line), looked


def test_host_mounts_reach_a_private_namespace_and_its_mounts_stay_in_it(base: Path) -> None:
    target = base / "shared" / "target"
    target.mkdir()

    def host_step() -> None:  # mounted after the child left: only the shared one propagates
        for name in ("shared", "private"):
            tmpfs(base / name / "late")
            (base / name / "late" / "marker").touch()

    def work() -> dict[str, bool]:
        seen_privately = (base / "private" / "late" / "marker").exists()
        # As pykata binds a volume: as the host sees it now.
        tree = in_host_mounts(lambda: clone_tree(str(base / "private" / "late"), recursive=True))
        try:
            attach_tree(tree, str(target))
        finally:
            os.close(tree)
        tmpfs(base / "shared" / "mine")
        return {
            "shared": (base / "shared" / "late" / "marker").exists(),
            "private": seen_privately,
            "bound": (target / "marker").exists(),
            "mine": os.path.ismount(base / "shared" / "mine"),
        }

    seen, host_mounts = in_private_child(host_step, work, lambda: mounts_under(str(base)))
    assert seen == {"shared": True, "private": False, "bound": True, "mine": True}
    # The child's mounts, on a shared mount too, never reached the host.
    assert str(target) not in host_mounts
    assert str(base / "shared" / "mine") not in host_mounts
