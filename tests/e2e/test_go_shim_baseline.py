"""The harness itself, proven with containerd's own Go shim (io.containerd.runc.v2)."""

import pytest
from harness import GO_RUNTIME, PrivateContainerd, wait_until

pytestmark = pytest.mark.timeout(120)


def test_run_rm_prints_output_and_returns_exit_code(containerd: PrivateContainerd) -> None:
    result = containerd.ctr(
        "run", "--rm", "--runtime", GO_RUNTIME, containerd.image, "go-rm",
        "sh", "-c", "echo hello; exit 3",
        check=False,
    )  # fmt: skip

    assert (result.returncode, result.stdout) == (3, "hello\n"), result.stderr
    assert not containerd.bundle("go-rm").exists()
    assert containerd.ctr("containers", "ls", "-q").stdout == ""


def test_detached_task_runs_until_killed(containerd: PrivateContainerd) -> None:
    with containerd.events() as events:
        containerd.run_detached("go-d", "sleep", "1000", runtime=GO_RUNTIME)
        assert containerd.task_status("go-d") == "RUNNING"
        assert (containerd.bundle("go-d") / "config.json").is_file()
        assert len(containerd.shim_pids()) == 1

        containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "go-d")
        events.wait_for("/tasks/exit")
        assert wait_until(lambda: containerd.task_status("go-d") == "STOPPED", timeout=10)
        containerd.ctr("tasks", "delete", "go-d")

    task_topics = [topic for topic in events.topics() if topic.startswith("/tasks/")]
    assert task_topics[:3] == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    # The 2.x Go shim publishes /tasks/delete asynchronously and sometimes exits before it
    # is sent; 1.x publishes it before Delete returns.
    expected_delete = (
        [["/tasks/delete"]] if containerd.version.startswith("1.") else [[], ["/tasks/delete"]]
    )
    assert task_topics[3:] in expected_delete
    assert '"exit_status":137' in events.wait_for("/tasks/exit")


def test_restart_keeps_the_task_running(containerd: PrivateContainerd) -> None:
    containerd.run_detached("go-restart", "sleep", "1000", runtime=GO_RUNTIME)

    containerd.restart()

    assert containerd.task_status("go-restart") == "RUNNING"
    containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "go-restart")
    assert wait_until(lambda: containerd.task_status("go-restart") == "STOPPED", timeout=10)
