"""Docker Engine on our shims: everything a docker user does, per backend, with
`docker run --runtime io.containerd.py*.v1` against a private dockerd and containerd.

Each backend runs the same scenarios with programs of its own kind: busybox for the Linux
backends, the WASI test programs (tests/e2e/wasm) for pywasm. Where a backend cannot do
something, the test checks the clear error it gives instead (README, Use with Docker).
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from dockerd import PrivateDockerd, Terminal
from harness import GO_RUNTIME, image_ref, wait_until
from vm_support import require_vm
from wasm_image import IMAGE as WASM_IMAGE

from shim.sys.cgroups import Cgroup

pytestmark = pytest.mark.timeout(240)

BUSYBOX = image_ref(Path(__file__).resolve().parents[2] / "var" / "images" / "busybox.tar")
MiB = 1024 * 1024
HTTP_PORT = 8080


@dataclass(frozen=True)
class Backend:
    name: str
    image: str
    say: tuple[str, ...]  # prints "out" on stdout and "err" on stderr, exits with 3
    serve: tuple[str, ...]  # prints SERVING once, then runs until killed
    serving: str
    cat: tuple[str, ...]  # copies stdin to stdout
    oom: tuple[str, ...]  # allocates memory until killed

    @property
    def runtime(self) -> str:
        return GO_RUNTIME if self.name == "runc" else f"io.containerd.{self.name}.v1"

    @property
    def linux(self) -> bool:
        return self.name != "pywasm"


def busybox_backend(name: str) -> Backend:
    return Backend(
        name=name,
        image=BUSYBOX,
        say=("sh", "-c", "echo out; echo err >&2; exit 3"),
        serve=("sh", "-c", "echo serving; exec sleep 1000"),
        serving="serving",
        cat=("cat",),
        # tail keeps the last line of /dev/zero, which never ends: it grows until killed.
        oom=("tail", "/dev/zero"),
    )


WASM = Backend(
    name="pywasm",
    image=WASM_IMAGE,
    say=("/say.wasm", "out", "err", "3"),
    serve=("/tick.wasm",),
    serving="tick1",
    cat=("/cat.wasm",),
    oom=("/oom.wasm",),
)
# `runc` is containerd's own shim (docker's default runtime): the reference for what docker does.
LINUX_BACKENDS = ["runc", "pyrunc", "pyrunsc", "pykata"]
BACKENDS = {b.name: b for b in [*map(busybox_backend, LINUX_BACKENDS), WASM]}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    chosen = BACKENDS[request.param]
    if chosen.name == "pykata":
        require_vm()
    if chosen.name == "pywasm":
        request.getfixturevalue("wasm_image")
    return chosen


def run_detached(
    dockerd: PrivateDockerd, backend: Backend, *command: str, flags: tuple[str, ...] = ()
) -> str:
    """`docker run -d` of command (the backend's serve program by default); the container id,
    once its output has begun."""
    command = command or backend.serve
    argv = ["run", "-d", "--network", "none", "--runtime", backend.runtime, *flags]
    container = dockerd.docker(*argv, backend.image, *command, timeout=120).stdout.strip()
    if not command or command == backend.serve:
        assert wait_until(
            lambda: backend.serving in logs(dockerd, container), timeout=60, interval=0.2
        ), logs(dockerd, container)
    return container


def logs(dockerd: PrivateDockerd, container: str) -> str:
    return dockerd.docker("logs", container).stdout


def state(dockerd: PrivateDockerd, container: str) -> dict[str, object]:
    found: dict[str, object] = dockerd.inspect(container)["State"]
    return found


def wait_exit(dockerd: PrivateDockerd, container: str, timeout: float = 60) -> int:
    return int(dockerd.docker("wait", container, timeout=timeout).stdout.strip())


def top_pids(dockerd: PrivateDockerd, container: str) -> tuple[list[int], str]:
    """The PID column of `docker top`, and its whole output."""
    output = dockerd.docker("top", container).stdout
    lines = output.splitlines()
    column = lines[0].split().index("PID")
    return [int(line.split()[column]) for line in lines[1:]], output


# -- run, logs, exec -------------------------------------------------------------------------


def test_run_rm_gives_stdout_stderr_and_exit_code(
    dockerd: PrivateDockerd, backend: Backend
) -> None:
    argv = ["run", "--rm", "--network", "none", "--runtime", backend.runtime, backend.image]
    result = dockerd.docker(*argv, *backend.say, check=False, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert dockerd.docker("ps", "-aq").stdout == ""


def test_detached_logs_and_follow(dockerd: PrivateDockerd, backend: Backend) -> None:
    said = run_detached(dockerd, backend, *backend.say)
    assert wait_exit(dockerd, said) == 3
    split = dockerd.docker("logs", said)
    assert (split.stdout, split.stderr) == ("out\n", "err\n")

    serving = run_detached(dockerd, backend)
    follower = dockerd.popen("logs", "-f", serving, stdout=-1, stderr=-1)
    try:
        assert follower.stdout is not None
        assert backend.serving in follower.stdout.readline().decode()
        dockerd.docker("kill", serving)
        # The container's end ends `logs -f`.
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
        follower.wait()


def test_exec_options(dockerd: PrivateDockerd, backend: Backend) -> None:
    container = run_detached(dockerd, backend)
    exec_ = ["exec", container]
    fed = dockerd.docker("exec", "-i", container, *backend.cat, input="to stdin\n")
    assert fed.stdout == "to stdin\n"
    said = dockerd.docker(*exec_, *backend.say, check=False)
    assert (said.returncode, said.stdout, said.stderr) == (3, "out\n", "err\n")
    if not backend.linux:
        printed = dockerd.docker("exec", "-e", "PYSHIM=docker", container, "/echo.wasm").stdout
        assert "env PYSHIM=docker" in printed.splitlines()
        greeting = dockerd.docker("exec", "-w", "/data", container, "/cat.wasm", "greeting.txt")
        assert greeting.stdout == "greetings from the rootfs\n"
        return
    assert dockerd.docker("exec", "-u", "nobody", container, "id", "-u").stdout == "65534\n"
    assert dockerd.docker("exec", "-w", "/tmp", container, "pwd").stdout == "/tmp\n"
    env = dockerd.docker("exec", "-e", "PYSHIM=docker", container, "sh", "-c", "echo $PYSHIM")
    assert env.stdout == "docker\n"
    dockerd.docker("exec", "-d", container, "sh", "-c", "echo detached > /tmp/mark")
    assert wait_until(
        lambda: dockerd.docker(*exec_, "cat", "/tmp/mark", check=False).stdout == "detached\n",
        timeout=20,
        interval=0.2,
    )
    tty = dockerd.docker("exec", "-t", container, "sh", "-c", "test -t 1 && echo tty")
    assert tty.stdout == "tty\n"  # as with runc: the CLI is not on a terminal here


def test_run_with_terminal_size_and_resize(dockerd: PrivateDockerd, backend: Backend) -> None:
    argv = ["run", "--rm", "-it", "--network", "none", "--runtime", backend.runtime, backend.image]
    if not backend.linux:
        # WASI has no terminal size; what is typed reaches the module through the terminal.
        terminal = Terminal(dockerd, *argv, *backend.cat, rows=30, cols=100)
        try:
            terminal.send("typed\n")
            # The container's pty echoes the line, then the module copies it.
            assert terminal.read_until("typed\r\ntyped\r\n", timeout=120), terminal.output
            terminal.send("\x04")  # ^D: end of input
            assert terminal.wait(timeout=60) == 0
        finally:
            terminal.close()
        return
    terminal = Terminal(dockerd, *argv, "sh", rows=30, cols=100)
    try:
        # Typed at the prompt, as a user does: a shell that starts line editing flushes input
        # typed before it.
        assert terminal.read_until("# ", timeout=120), terminal.output
        terminal.send("stty size; echo size-printed\n")
        assert terminal.read_until("30 100\r\nsize-printed", timeout=120), terminal.output
        terminal.resize(40, 120)
        # docker sends the new size on SIGWINCH; stty then reads it from the container's pty.

        def resized() -> bool:
            terminal.send("stty size\n")
            return terminal.read_until("40 120", timeout=1)

        assert wait_until(resized, timeout=20), terminal.output
        terminal.send("exit 7\n")
        assert terminal.wait(timeout=60) == 7
    finally:
        terminal.close()


# -- signals, stop, pause --------------------------------------------------------------------


def test_kill_with_a_signal_then_stop_after_the_grace_period(
    dockerd: PrivateDockerd, backend: Backend
) -> None:
    if backend.linux:
        script = (
            "trap '' TERM; trap 'echo got USR1' USR1; echo serving; while true; do sleep 0.1; done"
        )
        container = run_detached(dockerd, backend, "sh", "-c", script)
        assert wait_until(lambda: "serving" in logs(dockerd, container), timeout=60)
        dockerd.docker("kill", "-s", "USR1", container)
        assert wait_until(lambda: "got USR1" in logs(dockerd, container), timeout=20)
        assert state(dockerd, container)["Running"] is True
    else:
        # A module cannot handle signals: USR1 ends it, and SIGTERM ends the next at once.
        killed = run_detached(dockerd, backend)
        dockerd.docker("kill", "-s", "USR1", killed)
        assert wait_exit(dockerd, killed) == 128 + 10
        container = run_detached(dockerd, backend)
    began = time.monotonic()
    dockerd.docker("stop", "-t", "2", container, timeout=60)
    took = time.monotonic() - began
    code = state(dockerd, container)["ExitCode"]
    if backend.linux:
        # SIGTERM is ignored: SIGKILL once the 2 s grace is over.
        assert (code, took >= 2) == (137, True), took
    else:
        assert code == 143


@pytest.fixture(params=LINUX_BACKENDS)
def linux_backend(request: pytest.FixtureRequest) -> Backend:
    """The backends whose programs can handle signals (WASI has no signal handlers)."""
    if request.param == "pykata":
        require_vm()
    return BACKENDS[request.param]


def test_stop_lets_a_handler_run(dockerd: PrivateDockerd, linux_backend: Backend) -> None:
    backend = linux_backend
    script = "trap 'echo got TERM; exit 0' TERM; echo serving; while true; do sleep 0.1; done"
    container = run_detached(dockerd, backend, "sh", "-c", script)
    assert wait_until(lambda: "serving" in logs(dockerd, container), timeout=60)
    dockerd.docker("stop", "-t", "30", container, timeout=60)
    assert state(dockerd, container)["ExitCode"] == 0
    assert "got TERM" in logs(dockerd, container)


def test_pause_unpause_and_kill_while_paused(dockerd: PrivateDockerd, backend: Backend) -> None:
    container = run_detached(dockerd, backend)
    dockerd.docker("pause", container)
    assert state(dockerd, container)["Status"] == "paused"
    dockerd.docker("unpause", container)
    assert state(dockerd, container)["Status"] == "running"
    exec_ = dockerd.docker("exec", container, *backend.say, check=False)
    assert exec_.returncode == 3

    dockerd.docker("pause", container)
    dockerd.docker("kill", container, timeout=60)
    assert wait_exit(dockerd, container) == 137
    assert state(dockerd, container)["Status"] == "exited"
    # `rm -f` of a paused container: test_events_of_a_container_life.


# -- top, stats, update ------------------------------------------------------------------------


def top_lists_the_container_and_exec_processes(
    dockerd: PrivateDockerd, backend: Backend, container: str
) -> None:
    init_pid = int(state(dockerd, container)["Pid"])  # type: ignore[call-overload]
    pids, output = top_pids(dockerd, container)
    assert init_pid in pids, output
    if backend.name == "pykata":
        # Every process of the VM is QEMU on the host (README): one row, whatever runs.
        dockerd.docker("exec", "-d", container, "sleep", "500")
        assert top_pids(dockerd, container)[0] == [init_pid]
        return
    exec_ = ("sleep", "500") if backend.linux else ("/sleep.wasm", "500")
    dockerd.docker("exec", "-d", container, *exec_)

    def exec_listed() -> bool:
        now, _ = top_pids(dockerd, container)
        return init_pid in now and len(now) == len(pids) + 1

    assert wait_until(exec_listed, timeout=20, interval=0.2), top_pids(dockerd, container)[1]
    if backend.name == "pyrunc":
        assert "sleep 500" in top_pids(dockerd, container)[1]


def stats_show_usage(dockerd: PrivateDockerd, container: str) -> None:
    def stats() -> dict[str, str]:
        printed = dockerd.docker("stats", "--no-stream", "--format", "{{json .}}", container)
        found: dict[str, str] = json.loads(printed.stdout)
        return found

    def has_usage() -> bool:
        return not stats()["MemUsage"].startswith("0B") and int(stats()["PIDs"]) >= 1

    assert wait_until(has_usage, timeout=30, interval=0.5), stats()


def cgroup_limits(dockerd: PrivateDockerd, backend: Backend, container: str) -> dict[str, str]:
    """memory, CPU quota and pids limits of the container's cgroup: the host's, or for the VM
    backend the guest's (read inside the container)."""
    if backend.name == "pykata":
        files = {"memory": "memory.max", "cpu": "cpu.max", "pids": "pids.max"}
        # docker leaves the container in the host's cgroup namespace (the guest's, here).
        script = 'cd "/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)" && cat "$@"'
        read = dockerd.docker("exec", container, "sh", "-c", script, "sh", *files.values())
        return dict(zip(files, read.stdout.split("\n")[:3], strict=True))
    cgroup = Cgroup.for_pid(int(state(dockerd, container)["Pid"]))  # type: ignore[call-overload]
    names = (
        {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us", "pids": "pids.max"}
        if cgroup.version == 1
        else {"memory": "memory.max", "cpu": "cpu.max", "pids": "pids.max"}
    )
    return {
        controller: Path(cgroup.path(controller), name).read_text().strip()
        for controller, name in names.items()
    }


def update_sets_memory_cpus_and_pids(
    dockerd: PrivateDockerd, backend: Backend, container: str
) -> None:
    argv = ["update", "--memory", "48m", "--memory-swap", "96m", "--cpus", "0.5"]
    dockerd.docker(*argv, "--pids-limit", "40", container)
    limits = cgroup_limits(dockerd, backend, container)
    cpu = limits["cpu"].split()[0]
    assert (limits["memory"], cpu, limits["pids"]) == (str(48 * MiB), "50000", "40"), limits
    if backend.name in ("pyrunsc", "pywasm"):
        # They write the cgroup themselves and know no cpuset: a clear error, nothing changed.
        refused = dockerd.docker("update", "--cpuset-cpus", "0", container, check=False)
        assert refused.returncode != 0
        assert "cannot set cpu.cpus" in refused.stderr, refused.stderr
        assert cgroup_limits(dockerd, backend, container) == limits


def test_top_stats_and_update_of_a_running_container(
    dockerd: PrivateDockerd, backend: Backend
) -> None:
    """One container (a VM boot is ~10 s): `top` with a detached exec, `stats --no-stream`
    showing usage, then `update` of memory, cpus and pids read back from the cgroup."""
    container = run_detached(dockerd, backend)
    top_lists_the_container_and_exec_processes(dockerd, backend, container)
    stats_show_usage(dockerd, container)
    update_sets_memory_cpus_and_pids(dockerd, backend, container)


def test_memory_limit_gives_oomkilled(dockerd: PrivateDockerd, backend: Backend) -> None:
    flags = ("--memory", "32m", "--memory-swap", "32m")
    container = run_detached(dockerd, backend, *backend.oom, flags=flags)
    assert wait_exit(dockerd, container, timeout=120) == 137
    assert state(dockerd, container)["OOMKilled"] is True


# -- the default bridge network ---------------------------------------------------------------

# Docker's bridge is set up by its libnetwork-setkey hook in the namespace the runtime makes:
# on the host for runc and gVisor; a VM's containers and a module get no network from it (README).
BRIDGE_BACKENDS = ["runc", "pyrunc", "pyrunsc"]


@pytest.mark.parametrize("name", BRIDGE_BACKENDS)
def test_default_bridge_network_reaches_the_container(dockerd: PrivateDockerd, name: str) -> None:
    """`docker run` without --network: the container gets an address on dockerd's bridge, and
    the host reaches a server in it over the bridge."""
    backend = BACKENDS[name]
    # pyrunsc by the README's daemon.json entry: its runsc.toml says what to do where gVisor's
    # netstack cannot run (this runsc on a kernel of 6.11 or later).
    runtime = "pyrunsc" if name == "pyrunsc" else backend.runtime
    script = f"mkdir -p /www && hostname > /www/index.html && exec httpd -f -p {HTTP_PORT} -h /www"
    argv = ["run", "-d", "--runtime", runtime, backend.image, "sh", "-c", script]
    container = dockerd.docker(*argv, timeout=120).stdout.strip()
    address = dockerd.inspect(container)["NetworkSettings"]["IPAddress"]
    assert ipaddress.IPv4Address(address) in dockerd.bridge.subnet
    answers: list[str] = []

    def answered() -> bool:
        try:
            with urllib.request.urlopen(f"http://{address}:{HTTP_PORT}/", timeout=5) as response:
                answers.append(bytes(response.read()).decode().strip())
        except OSError as exc:
            answers.append(str(exc))
            return False
        return True

    assert wait_until(answered, timeout=30, interval=0.5), answers[-1]
    assert answers[-1] == container[:12]  # docker's hostname for it


# -- restart, events, dockerd restarts -----------------------------------------------------------


def test_restart_keeps_the_output_of_both_runs(dockerd: PrivateDockerd, backend: Backend) -> None:
    container = run_detached(dockerd, backend)
    dockerd.docker("restart", "-t", "1", container, timeout=120)
    assert wait_until(
        lambda: logs(dockerd, container).count(backend.serving) == 2, timeout=60, interval=0.2
    ), logs(dockerd, container)
    assert state(dockerd, container)["Running"] is True


def test_events_of_a_container_life(dockerd: PrivateDockerd, backend: Backend) -> None:
    """Exec, pause, unpause, then `rm -f` while paused: every event, in order."""
    since = str(int(time.time()) - 1)
    container = run_detached(dockerd, backend)
    dockerd.docker("exec", container, *backend.say, check=False)
    dockerd.docker("pause", container)
    dockerd.docker("unpause", container)
    dockerd.docker("pause", container)
    dockerd.docker("rm", "-f", container, timeout=60)
    assert dockerd.docker("ps", "-aq").stdout == ""
    until = str(int(time.time()) + 1)
    printed = dockerd.docker(
        "events", "--since", since, "--until", until, "--filter", f"container={container}",
        "--format", "{{.Action}}",
    ).stdout.split()  # fmt: skip
    actions = [a.split(":")[0] for a in printed]
    until_kill = ["create", "start", "exec_create", "exec_start", "exec_die", "pause", "unpause",
                  "pause", "kill"]  # fmt: skip
    seen = [a for a in actions if a in [*until_kill, "die", "destroy"]]
    assert seen[: len(until_kill)] == until_kill, printed
    # Docker resumes a container it SIGKILLed paused; whether that "unpause" is reported before
    # the exit is a race (with runc too).
    assert [a for a in seen[len(until_kill) :] if a != "unpause"] == ["die", "destroy"], printed


def wait_running(dockerd: PrivateDockerd, container: str, running: bool) -> Callable[[], bool]:
    return lambda: state(dockerd, container)["Running"] is running


def test_dockerd_restart_with_live_restore_keeps_containers(
    dockerd: PrivateDockerd, backend: Backend
) -> None:
    dockerd.restart(live_restore=True)
    try:
        container = run_detached(dockerd, backend)
        pid = state(dockerd, container)["Pid"]
        dockerd.restart()
        assert (state(dockerd, container)["Running"], state(dockerd, container)["Pid"]) == (
            True,
            pid,
        )
        exec_ = dockerd.docker("exec", container, *backend.say, check=False)
        assert (exec_.returncode, exec_.stdout) == (3, "out\n")
        dockerd.docker("kill", container)
        assert wait_exit(dockerd, container) == 137
    finally:
        dockerd.remove_all()
        dockerd.restart(live_restore=False)


def test_dockerd_restart_without_live_restore_stops_containers(
    dockerd: PrivateDockerd, backend: Backend
) -> None:
    container = run_detached(dockerd, backend)
    dockerd.restart()
    assert state(dockerd, container)["Running"] is False
    started = dockerd.docker("start", container, check=False, timeout=120)
    assert started.returncode == 0, started.stderr
    assert wait_until(
        lambda: logs(dockerd, container).count(backend.serving) == 2, timeout=60, interval=0.2
    ), logs(dockerd, container)


def test_unknown_runtime_is_a_clear_error(dockerd: PrivateDockerd) -> None:
    argv = ["run", "--rm", "--network", "none", "--runtime", "io.containerd.pynothing.v1"]
    result = dockerd.docker(*argv, BUSYBOX, "true", check=False, timeout=60)
    assert result.returncode != 0
    assert "pynothing" in result.stderr


def test_daemon_json_runtime_entry_passes_its_options(dockerd: PrivateDockerd) -> None:
    """`--runtime pyrunsc` by its daemon.json name: the entry's ConfigPath reaches the shim."""
    argv = ["run", "-d", "--network", "none", "--runtime", "pyrunsc", BUSYBOX, "sleep", "100"]
    container = dockerd.docker(*argv, timeout=120).stdout.strip()
    assert dockerd.inspect(container)["HostConfig"]["Runtime"] == "pyrunsc"
    debug_log = dockerd.runsc_debug_log / container
    assert any(debug_log.iterdir()), f"runsc wrote no debug log in {debug_log}"
