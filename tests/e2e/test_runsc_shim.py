"""containerd-shim-pyrunsc-v1 end to end: real ctr, real containerd, real runsc (gVisor)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cgroup_support import assert_real_metrics
from harness import EXEC_THEN_KILL_TOPICS, PrivateContainerd, wait_until
from runsc_support import require_runsc

RUNTIME = "io.containerd.pyrunsc.v1"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def runsc_usable() -> None:
    require_runsc()


def run(
    containerd: PrivateContainerd, *args: str, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return containerd.ctr("run", "--runtime", RUNTIME, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def sleeper(containerd: PrivateContainerd) -> Iterator[str]:
    """A detached runsc container running `sleep`; killed and deleted afterwards."""
    name = "rs-sleeper"
    containerd.run_detached(name, "sleep", "1000", runtime=RUNTIME)
    yield name
    containerd.kill_and_delete(name, check=False)


@pytest.mark.cgroup
def test_run_rm_prints_output_and_returns_exit_code(containerd: PrivateContainerd) -> None:
    script = "echo hello; echo oops >&2; exit 7"
    result = run(containerd, "--rm", containerd.image, "rs-rm", "sh", "-c", script, check=False)

    assert result.returncode == 7, result.stderr
    assert result.stdout == "hello\n"
    assert "oops" in result.stderr
    assert not containerd.bundle("rs-rm").exists()


def test_detached_task_runs_in_gvisor_and_exec_works(
    containerd: PrivateContainerd, sleeper: str
) -> None:
    assert containerd.task_status(sleeper) == "RUNNING"
    # The user-space kernel says who it is.
    assert "gVisor" in containerd.exec_output(sleeper, "dmesg")

    result = containerd.ctr(
        "tasks", "exec", "--exec-id", "e1", sleeper, "sh", "-c", "echo out; echo err >&2; exit 5",
        check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (5, "out\n"), result.stderr
    assert "err" in result.stderr
    piped = containerd.ctr(
        "tasks", "exec", "--exec-id", "e2", sleeper, "sh", "-c", "cat; echo end", input="hi\n"
    )
    assert piped.stdout == "hi\nend\n"


def test_ps_names_the_exec_and_killing_an_exec_ends_it_in_the_sandbox(
    containerd: PrivateContainerd, sleeper: str
) -> None:
    execer = containerd.start_ctr("tasks", "exec", "--exec-id", "busy", sleeper, "sleep", "300")
    try:

        def listed() -> list[str]:
            return containerd.ctr("tasks", "ps", sleeper).stdout.splitlines()[1:]

        assert wait_until(lambda: any("busy" in line for line in listed()), timeout=20)
        by_pid = {int(line.split()[0]): line for line in listed()}
        assert containerd.task_pid(sleeper) in by_pid

        containerd.ctr("tasks", "kill", "--exec-id", "busy", "--signal", "SIGKILL", sleeper)
        assert execer.wait(timeout=20) == 137
        # The process inside the sandbox is gone too, not only runsc's waiter on the host.
        assert wait_until(lambda: len(listed()) == 1, timeout=10), listed()
    finally:
        containerd.stop_exec(execer, sleeper, "busy")


def test_kill_reports_the_signal_status(containerd: PrivateContainerd) -> None:
    name = "rs-term"
    trap = 'trap "exit 143" TERM; while :; do sleep 0.1; done'
    containerd.run_detached(name, "sh", "-c", trap, runtime=RUNTIME)
    with containerd.events() as events:
        containerd.ctr("tasks", "kill", name)
        assert '"exit_status":143' in events.wait_for("/tasks/exit", timeout=20)
    containerd.ctr("tasks", "delete", name)
    containerd.ctr("containers", "delete", name)


@pytest.mark.cgroup
def test_pause_and_resume(containerd: PrivateContainerd) -> None:
    name = "rs-counter"
    counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.05; done"
    containerd.run_detached(name, "sh", "-c", counter, runtime=RUNTIME)

    def count() -> int:
        return int(containerd.exec_output(name, "cat", "/tmp/n").strip() or 0)

    assert wait_until(lambda: count() > 0, timeout=20)
    with containerd.events() as events:
        containerd.ctr("tasks", "pause", name)
        assert containerd.task_status(name) == "PAUSED"
        containerd.ctr("tasks", "resume", name)
        assert containerd.task_status(name) == "RUNNING"
    assert events.topics()[:2] == ["/tasks/paused", "/tasks/resumed"]
    before = count()
    assert wait_until(lambda: count() > before + 2, timeout=20)
    containerd.ctr("tasks", "kill", "--signal", "SIGKILL", name)
    assert wait_until(lambda: containerd.task_status(name) == "STOPPED", timeout=20)
    containerd.ctr("tasks", "delete", name)
    containerd.ctr("containers", "delete", name)


@pytest.mark.cgroup
def test_metrics_come_from_the_sandbox(containerd: PrivateContainerd, sleeper: str) -> None:
    as_json = json.loads(containerd.ctr("tasks", "metrics", "--format", "json", sleeper).stdout)

    assert as_json["pids"]["current"] >= 1, as_json
    usage = as_json["memory"]["usage"]
    assert (usage["usage"] if isinstance(usage, dict) else usage) > 0, as_json
    assert_real_metrics(containerd, sleeper)


def test_events_in_order_with_ids(containerd: PrivateContainerd) -> None:
    name = "rs-ev"
    events = containerd.exec_then_kill_events(
        name, ("sleep", "1000"), ("sh", "-c", "exit 4"), runtime=RUNTIME, stop_timeout=20
    )
    containerd.ctr("containers", "delete", name)
    assert events.task_topics() == EXEC_THEN_KILL_TOPICS
    exec_exit, init_exit = events.lines_of("/tasks/exit")
    assert '"id":"ev-x"' in exec_exit and '"exit_status":4' in exec_exit
    assert '"id":"rs-ev"' in init_exit and '"exit_status":137' in init_exit


def test_stdin_reaches_the_container(containerd: PrivateContainerd) -> None:
    name = "rs-stdin"
    command = ("run", "--rm", "--runtime", RUNTIME, containerd.image, name)
    code, out, err = containerd.feed_stdin(
        name, *command, "sh", "-c", "cat; echo done", data=b"line one\nline two\n"
    )
    assert code == 0, err
    assert out == b"line one\nline two\ndone\n"


def test_run_with_terminal_sees_its_size(containerd: PrivateContainerd) -> None:
    command = ("sh", "-c", "sleep 0.5; stty size; [ -t 0 ] && [ -t 1 ] && echo on-a-terminal")
    status, output = containerd.ctr_in_terminal(
        "run", "-t", "--rm", "--runtime", RUNTIME, containerd.image, "rs-tty", *command
    )
    text = output.decode(errors="replace")
    assert "37 113" in text, text
    assert "on-a-terminal" in text, text
    assert status == 0


def test_runsc_toml_flags_take_effect(containerd: PrivateContainerd, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    config = tmp_path / "runsc.toml"
    # gVisor's format: [runsc_config] holds runsc flags; %ID% is the container id.
    config.write_text(f'[runsc_config]\ndebug = true\ndebug-log = "{logs}/%ID%/"\n')

    result = run(
        containerd, "--rm", "--runtime-config-path", str(config), containerd.image, "rs-conf",
        "echo", "configured",
    )  # fmt: skip

    assert result.stdout == "configured\n"
    written = sorted(p.name for p in (logs / "rs-conf").iterdir())
    assert any(".boot." in name for name in written), written
    assert any(".create." in name for name in written), written


def test_unreadable_runsc_toml_is_a_clear_error(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.toml"
    result = run(
        containerd, "--rm", "--runtime-config-path", str(missing), containerd.image, "rs-bad",
        "true", check=False,
    )  # fmt: skip

    assert result.returncode != 0
    assert str(missing) in result.stderr, result.stderr
    containerd.ctr("containers", "delete", "rs-bad", check=False)
