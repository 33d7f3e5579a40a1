"""containerd-shim-pykata-v1 end to end: real ctr, real containerd, each container in a QEMU VM.

A VM boots in ~20 s under TCG (this machine's KVM hangs a guest), so each test runs one VM
and checks as much of it as it can.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import REPO, PrivateContainerd, mounts_under, wait_until
from vm_support import require_vm

from shim.kata.state import VmPaths, qemu_pid

RUNTIME = "io.containerd.pykata.v1"
BOOT = 240  # seconds for a ctr command that boots a VM, on a busy 2-core machine

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def vm_capable() -> None:
    require_vm()


def vm_of(containerd: PrivateContainerd, name: str) -> VmPaths:
    return VmPaths.for_group(containerd.namespace, name)


def assert_vm_gone(paths: VmPaths, qemu: int) -> None:
    """QEMU, its sockets, files and mounts are gone (containerd may still run `delete`)."""
    gone = wait_until(lambda: not qemu_pid(paths) and not paths.root.exists(), timeout=15)
    assert gone, (qemu, list(paths.root.rglob("*")))
    assert not mounts_under(paths.root)


@pytest.fixture
def sleeper(containerd: PrivateContainerd) -> Iterator[str]:
    name = "kata-sleeper"
    containerd.ctr(
        "run", "-d", "--runtime", RUNTIME, containerd.image, name, "sleep", "1000", timeout=BOOT
    )
    yield name
    containerd.kill_and_delete(name, check=False)


def test_run_rm_isolated_in_its_own_kernel(containerd: PrivateContainerd) -> None:
    """Output, stdin and the exit code of `ctr run --rm`; the container sees the guest's
    kernel, none of the host's processes, no host path; the VM goes with it."""
    marker = Path(tempfile.mkdtemp(prefix="pyshim-kata-host-"))
    script = (
        "read line; echo got:$line; echo oops >&2; uname -r; cat /proc/version;"
        f" ls /proc | grep -c '^[0-9]'; test -e {marker} && echo SEES-HOST-TMP;"
        f" test -e {REPO} && echo SEES-REPO; test -e /usr/bin/python3 && echo SEES-HOST-USR;"
        " exit 7"
    )
    name = "kata-rm"
    try:
        result = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME, containerd.image, name, "sh", "-c", script,
            input="hello\n", timeout=BOOT, check=False,
        )  # fmt: skip
    finally:
        marker.rmdir()
    lines = result.stdout.splitlines()
    assert result.returncode == 7, result
    assert lines[0] == "got:hello"
    assert "oops" in result.stderr
    assert lines[1] != os.uname().release
    assert lines[2] != Path("/proc/version").read_text().strip()
    assert int(lines[3]) < 5  # sh, ls, grep: the guest's container, not the host's thousands
    assert not any(line.startswith("SEES-") for line in lines), lines
    assert not containerd.bundle(name).exists()
    assert not vm_of(containerd, name).root.exists()


def test_one_vm_runs_exec_tty_pause_stats_and_kill_in_order(containerd: PrivateContainerd) -> None:
    name = "kata-life"
    with containerd.events() as events:
        containerd.ctr(
            "run", "-d", "--runtime", RUNTIME, containerd.image, name, "sleep", "1000", timeout=BOOT
        )
        qemu = containerd.task_pid(name)
        paths = vm_of(containerd, name)
        assert qemu == qemu_pid(paths)  # containerd sees QEMU, never a guest pid

        result = containerd.ctr(
            "tasks", "exec", "--exec-id", "e1", name, "sh", "-c", "echo out; echo err >&2; exit 5",
            check=False,
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (5, "out\n"), result.stderr
        assert "err" in result.stderr
        piped = containerd.ctr("tasks", "exec", "--exec-id", "e2", name, "cat", input="in\n")
        assert piped.stdout == "in\n"
        status, output = containerd.ctr_in_terminal(
            "tasks", "exec", "-t", "--exec-id", "e3", name, "sh", "-c", "sleep 1; stty size; tty"
        )
        assert (status, b"37 113" in output, b"/dev/pts/" in output) == (0, True, True), output

        busy = containerd.start_ctr("tasks", "exec", "--exec-id", "busy", name, "sleep", "300")
        try:
            listed = wait_until(lambda: "sleep 300" in containerd.exec_output(name, "ps"), 30)
            kill = ("tasks", "kill", "--exec-id", "busy", "--signal", "SIGKILL", name)
            killed = wait_until(lambda: containerd.ctr(*kill, check=False).returncode == 0, 30)
            assert (listed, killed, busy.wait(timeout=30)) == (True, True, 137)
        finally:
            busy.kill()
            busy.wait()

        # ctr task ps: QEMU's pid only, never a guest pid (a host tool would act on it).
        listed_pids = containerd.ctr("tasks", "ps", name).stdout.split()[2::2]
        assert listed_pids == [str(containerd.task_pid(name))], listed_pids

        containerd.ctr("tasks", "pause", name)
        assert containerd.task_status(name) == "PAUSED"
        containerd.ctr("tasks", "resume", name)
        assert containerd.task_status(name) == "RUNNING"

        metrics = json.loads(containerd.ctr("tasks", "metrics", "--format", "json", name).stdout)
        assert metrics["memory"]["usage"] > 0 and metrics["pids"]["current"] >= 1, metrics

        containerd.ctr("tasks", "kill", "--signal", "SIGKILL", name)
        assert wait_until(lambda: containerd.task_status(name) == "STOPPED", 30)
        containerd.ctr("tasks", "delete", name)
        events.wait_for("/tasks/delete")
    containerd.ctr("containers", "delete", name)
    topics = events.task_topics()
    assert topics[:2] == ["/tasks/create", "/tasks/start"]
    assert topics[-2:] == ["/tasks/exit", "/tasks/delete"]
    assert {"/tasks/paused", "/tasks/resumed", "/tasks/exec-started"} <= set(topics)
    init_exit = events.lines_of("/tasks/exit")[-1]
    assert f'"id":"{name}"' in init_exit and '"exit_status":137' in init_exit
    assert f'"pid":{qemu}' in init_exit
    assert_vm_gone(paths, qemu)


def test_oom_in_the_guest_is_reported_before_the_exit(containerd: PrivateContainerd) -> None:
    name = "kata-oom"
    hog = "x=aaaaaaaaaaaaaaaa; while :; do x=$x$x; done"
    with containerd.events() as events:
        result = containerd.ctr(
            "run", "--rm", "--memory-limit", str(32 * 2**20), "--runtime", RUNTIME,
            containerd.image, name, "sh", "-c", hog, check=False, timeout=BOOT,
        )  # fmt: skip
        events.wait_for("/tasks/delete")
    assert result.returncode == 137, result.stderr
    topics = events.task_topics()
    assert "/tasks/oom" in topics, topics
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit")


def test_qemu_killed_ends_the_task_with_255_and_cleans_up(
    containerd: PrivateContainerd, sleeper: str
) -> None:
    qemu = containerd.task_pid(sleeper)
    paths = vm_of(containerd, sleeper)
    with containerd.events() as events:
        os.kill(qemu, signal.SIGKILL)
        assert wait_until(lambda: containerd.task_status(sleeper) == "STOPPED", 30)
        containerd.ctr("tasks", "delete", sleeper)
        events.wait_for("/tasks/delete")
    assert '"exit_status":255' in events.lines_of("/tasks/exit")[0]
    assert_vm_gone(paths, qemu)


def test_delete_after_a_killed_shim_removes_qemu_sockets_and_mounts(
    containerd: PrivateContainerd, sleeper: str
) -> None:
    qemu = containerd.task_pid(sleeper)
    paths = vm_of(containerd, sleeper)
    # The rootfs is shared with the guest, in the shim's mount namespace (QEMU's), not the host's.
    assert mounts_under(paths.root, qemu)
    assert not mounts_under(paths.root)
    for shim in containerd.shim_pids():
        os.kill(shim, signal.SIGKILL)
    # containerd sees the shim go and runs `delete`.
    assert wait_until(lambda: containerd.task_status(sleeper) in ("STOPPED", "absent"), 30)
    assert_vm_gone(paths, qemu)
    for fifo_dir in containerd.fifo_dir.iterdir():  # ctr removes them at `tasks delete`
        shutil.rmtree(fifo_dir)


def test_task_survives_a_containerd_restart(containerd: PrivateContainerd, sleeper: str) -> None:
    qemu = containerd.task_pid(sleeper)
    containerd.restart()
    assert containerd.task_pid(sleeper) == qemu
    assert containerd.task_status(sleeper) == "RUNNING"
    assert containerd.exec_output(sleeper, "echo", "still here") == "still here\n"
