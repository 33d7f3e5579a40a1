"""The warm template: `start` and `delete` are relayed to one template, which forks the daemons
and exits when idle. The relay's cases run with both clients: the Python one (shim.relay, as
the console script or the launcher's fallback runs it) and the native launcher."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shim.api.task.v2 import shim_pb2 as api
from shim.native.build import build_launchers
from shim.relay import (
    EXIT_MAX,
    MESSAGE_MAX,
    SOCKET_DIR,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    relay,
    template_path,
)
from shim.template import IDLE_DEFAULT, IDLE_ENV, TEMPLATE_COMM, idle_time, spawn_template
from shim.ttrpc.client import Client

SHIM_NAME = "containerd-shim-pyrunc-v1"
TASK = "containerd.task.v2.Task"
CLIENTS = ("python", "native")


@pytest.fixture(scope="session")
def shim_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launcher built from source as the pyrunc shim, next to the Python entry point it
    falls back to (pyshim-shim, as pip writes it for this interpreter)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    assert build_launchers(bin_dir, [SHIM_NAME]) is not None
    entry = bin_dir / "pyshim-shim"
    entry.write_text(
        f"#!{sys.executable}\nimport sys\nfrom shim.main import launched\nsys.exit(launched())\n"
    )
    entry.chmod(0o755)
    return bin_dir


def client_argv(shim_bin: Path, client: str) -> list[str]:
    """What runs the shim program with that client; argv[0] of the shim is the launcher's path
    either way, so both find the same template."""
    shim = str(shim_bin / SHIM_NAME)
    return [shim] if client == "native" else [str(shim_bin / "pyshim-shim"), shim]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def wait_gone(pid: int, timeout: float) -> bool:
    """Gone or a zombie (this machine's pid 1 may not reap orphans)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


async def shutdown(address: str, task_id: str) -> None:
    client = await Client.connect(address.removeprefix("unix://"))
    try:
        await client.call(TASK, "Shutdown", api.ShutdownRequest(id=task_id), Empty, timeout=5)
    finally:
        await client.close()


class Shims:
    """Runs the shim program's `start` and `delete` as containerd would, through one relay
    client, for a fake containerd address of its own (so each test gets its own template)."""

    def __init__(self, tmp_path: Path, name: str, shim_bin: Path, client: str) -> None:
        if os.geteuid() != 0:
            pytest.skip(f"start binds under {SOCKET_DIR}, which needs root")
        self.tmp_path = tmp_path
        self.argv = client_argv(shim_bin, client)
        self.program = self.argv[-1]
        self.address = f"/pyshim-template-unit-{os.getpid()}-{name}-{client}.sock"
        # Idle 0: the template leaves with the test's last daemon.
        self.env = {"PATH": os.environ["PATH"], "TTRPC_ADDRESS": self.address + ".ttrpc"}
        self.env[IDLE_ENV] = "0"

    def run(self, task_id: str, action: str) -> subprocess.CompletedProcess[bytes]:
        bundle = self.tmp_path / task_id
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text("{}")
        flags = ["-namespace", "unit", "-address", self.address, "-id", task_id, action]
        done = subprocess.run(
            [*self.argv, *flags],
            cwd=bundle,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done

    def start(self, task_id: str) -> tuple[str, int]:
        """The address printed and the daemon's pid."""
        printed = self.run(task_id, "start").stdout.decode()
        return printed, int((self.tmp_path / task_id / "shim.pid").read_text())

    def stop(self, started: dict[str, tuple[str, int]]) -> None:
        """Shut down the daemons of the started task ids; they must exit."""
        for task_id, (printed, _pid) in started.items():
            asyncio.run(shutdown(printed, task_id))
        assert all(wait_gone(pid, timeout=10) for _printed, pid in started.values())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", CLIENTS)
def test_daemons_share_one_template_which_exits_when_idle(
    tmp_path: Path, shim_bin: Path, client: str
) -> None:
    shims = Shims(tmp_path, "idle", shim_bin, client)
    shims.env[IDLE_ENV] = "1"
    started = {task_id: shims.start(task_id) for task_id in ("a", "b")}
    daemons = [pid for _printed, pid in started.values()]
    template = parent_of(daemons[0])
    assert parent_of(daemons[1]) == template
    assert comm(template) == TEMPLATE_COMM
    assert comm(daemons[0]) != TEMPLATE_COMM
    assert "/_ssl." not in Path(f"/proc/{template}/maps").read_text()  # not imported: no TLS

    # `delete` (here of a never-created container) runs warm and prints a DeleteResponse.
    deleted = shims.run("a", "delete")
    assert api.DeleteResponse.FromString(deleted.stdout).exit_status == 137

    shims.stop(started)
    assert wait_gone(template, timeout=1 + 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", CLIENTS)
def test_the_template_exits_at_once_when_its_containerd_is_gone(
    tmp_path: Path, shim_bin: Path, client: str
) -> None:
    """However long its idle time, and with a daemon still running (which stays)."""
    shims = Shims(tmp_path, "gone", shim_bin, client)
    shims.env[IDLE_ENV] = "3600"
    bundle = tmp_path / "a"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    flags = ["-namespace", "unit", "-address", shims.address, "-id", "a", "start"]
    # A stand-in containerd: the shell runs `start`, then waits until its stdin closes.
    containerd = subprocess.Popen(
        ["sh", "-c", '"$@" </dev/null >printed && cat >/dev/null', "sh", *shims.argv, *flags],
        cwd=bundle,
        env=shims.env,
        stdin=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not (bundle / "shim.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    daemon = int((bundle / "shim.pid").read_text())
    template = parent_of(daemon)
    assert comm(template) == TEMPLATE_COMM
    assert containerd.stdin is not None
    containerd.stdin.close()
    assert containerd.wait(timeout=10) == 0
    assert wait_gone(template, timeout=10)
    shims.stop({"a": ((bundle / "printed").read_text(), daemon)})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, IDLE_DEFAULT),
        ("0", 0.0),
        ("2.5", 2.5),
        *((bad, IDLE_DEFAULT) for bad in ("-1", "x", "inf", "nan")),
    ],
)
def test_idle_time_is_a_setting(
    monkeypatch: pytest.MonkeyPatch, value: str | None, seconds: float
) -> None:
    if value is None:
        monkeypatch.delenv(IDLE_ENV, raising=False)
    else:
        monkeypatch.setenv(IDLE_ENV, value)
    assert idle_time() == seconds


@given(
    argv=st.lists(st.text(), min_size=1),
    cwd=st.text(),
    env=st.dictionaries(st.text().filter(lambda name: "=" not in name), st.text()),
)
def test_relay_request_round_trips(argv: list[str], cwd: str, env: dict[str, str]) -> None:
    def no_nul(text: str) -> str:  # what an argv or environment string can hold
        return text.replace("\0", "")

    argv, cwd = [no_nul(arg) for arg in argv], no_nul(cwd)
    env = {no_nul(name): no_nul(value) for name, value in env.items()}
    assert decode_request(encode_request(argv, cwd, env)) == (argv, cwd, env)


def test_relay_request_reads_the_environment_as_os_environ_does() -> None:
    request = word(1) + word(3) + b"shim\0/b\0A=1\0junk\0A=2\0"
    assert decode_request(request) == (["shim"], "/b", {"A": "1"})


def word(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder, signed=True)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"",
        word(1),
        word(0) + word(0) + b"/b\0",  # no argv
        word(1) + word(-1) + b"a\0/b\0",
        word(1) + word(0) + b"a\0/b",  # the last string unended
        word(1) + word(0) + b"a\0/b\0extra\0",
        word(2) + word(0) + b"a\0/b\0",  # fewer strings than counted
        word(2**31 - 1) + word(2**31 - 1) + b"a\0",
    ],
)
def test_relay_request_rejects_malformed_ones(request_bytes: bytes) -> None:
    with pytest.raises(ValueError):
        decode_request(request_bytes)


@pytest.mark.parametrize(
    ("reply", "maximum", "expected"),
    [(word(0), 255, 0), (word(255), 255, 255), (word(4242), 2**31 - 1, 4242)],
)
def test_reply_decodes(reply: bytes, maximum: int, expected: int) -> None:
    assert decode_reply(reply, maximum) == expected
    assert decode_reply(encode_reply(expected), maximum) == expected


@pytest.mark.parametrize("reply", [b"", b"\0", word(0) + b"\0", word(256), word(-1)])
def test_reply_rejects_malformed_ones(reply: bytes) -> None:
    with pytest.raises(ValueError):
        decode_reply(reply, 255)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", CLIENTS)
def test_template_survives_malformed_requests(tmp_path: Path, shim_bin: Path, client: str) -> None:
    shims = Shims(tmp_path, "bad", shim_bin, client)
    started = {"first": shims.start("first")}
    path = template_path(shims.address, shims.program)
    garbage = [
        (b"\x00not a request", True),  # undecodable, with descriptors
        (encode_request([shims.program, "start"], "/", {}), False),  # no descriptors
        (word(1) + word(0) + b"unended", True),
    ]
    for payload, with_fds in garbage:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(10)
            conn.connect(path)
            fds = [0, 1, 2] if with_fds else []
            socket.send_fds(conn, [payload], fds)
            assert conn.recv(100) == b""  # refused: no ack, nothing done
    started["second"] = shims.start("second")
    first, second = (pid for _printed, pid in started.values())
    assert parent_of(first) == parent_of(second)  # the same template served both
    shims.stop(started)


def test_relay_declines_when_the_program_is_not_run_by_its_path() -> None:
    # No template can be keyed for it: main() then does the command in its own process.
    assert relay(["no-such-shim-program", "-id", "x", "delete"], "/unused.sock", print) is None


@pytest.mark.parametrize("client", CLIENTS)
def test_a_program_not_run_by_its_path_does_delete_itself(
    tmp_path: Path, shim_bin: Path, client: str
) -> None:
    argv = client_argv(shim_bin, client)
    executable = argv[0]
    argv[-1] = SHIM_NAME  # found on PATH, say: nothing to key a template by
    done = subprocess.run(
        [*argv, "-namespace", "unit", "-address", "/unused.sock", "-id", "x", "delete"],
        executable=executable,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert api.DeleteResponse.FromString(done.stdout).exit_status == 137


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("flag", ["-v", "--v=true"])
def test_other_actions_are_answered_by_python(shim_bin: Path, client: str, flag: str) -> None:
    """The launcher execs the Python entry point with its own argv[0] (the name printed)."""
    argv = [*client_argv(shim_bin, client), "-address", "/unused.sock", flag, "start"]
    done = subprocess.run(argv, capture_output=True, timeout=30, check=True)
    assert done.stdout.startswith(f"{SHIM_NAME}:\n  Version: ".encode())


class ThreadWithResult(threading.Thread):
    def __init__(self, target: Callable[..., object], *args: object) -> None:
        super().__init__(target=self._run, args=(target, *args))
        self.error: BaseException | None = None
        self.start()

    def _run(self, target: Callable[..., object], *args: object) -> None:
        try:
            target(*args)
        except BaseException as exc:
            self.error = exc

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


class FakeTemplate:
    """Listens where a client looks for the template and answers one request as told."""

    def __init__(self, address: str, program: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(template_path(address, program))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.requests: list[tuple[list[str], str, dict[str, str]]] = []

    def answer(self, ack: bytes, result: bytes) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data, fds, _flags, _addr = socket.recv_fds(conn, MESSAGE_MAX, 3)
            for fd in fds:
                os.close(fd)
            assert len(fds) == 3
            self.requests.append(decode_request(data))
            conn.send(ack)
            if result:  # none: the worker died
                with contextlib.suppress(BrokenPipeError):  # the client gave up on the ack
                    conn.send(result)

    def close(self) -> None:
        os.unlink(self.listener.getsockname())
        self.listener.close()


def expected_exit(ack: bytes, result: bytes) -> int | None:
    """What docs/ARCHITECTURE.md says a client exits with: the result, or None for a protocol
    error or a dead worker (the client reports it and exits 1)."""
    try:
        decode_reply(ack, 2**31 - 1)
        return decode_reply(result, EXIT_MAX)
    except ValueError:
        return None


replies = st.one_of(
    st.integers(0, EXIT_MAX).map(encode_reply),
    st.integers(-(2**31), 2**31 - 1).map(encode_reply),
    st.binary(max_size=64),
)


@pytest.mark.parametrize("client", CLIENTS)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ack=replies.filter(bool), result=replies)
@example(ack=encode_reply(1), result=encode_reply(3))
@example(ack=encode_reply(1), result=encode_reply(256))
@example(ack=encode_reply(1), result=b"")
@example(ack=b"\0" * 100_000, result=encode_reply(0))
@example(ack=encode_reply(1), result=encode_reply(0) * 5)
def test_clients_read_the_templates_replies_as_documented(
    tmp_path: Path, shim_bin: Path, client: str, ack: bytes, result: bytes
) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"the template socket is under {SOCKET_DIR}, which needs root")
    argv = client_argv(shim_bin, client)
    address = f"/pyshim-template-fake-{os.getpid()}-{client}.sock"
    template = FakeTemplate(address, argv[-1])
    try:
        answering = ThreadWithResult(template.answer, ack, result)
        flags = ["-address", address, "-id", "x", "delete"]
        env = {"PATH": os.environ["PATH"], "SEEN": "yes"}
        done = subprocess.run(
            [*argv, *flags], cwd=tmp_path, env=env, capture_output=True, timeout=30
        )
        answering.result()
    finally:
        template.close()
    [(request_argv, cwd, request_env)] = template.requests
    assert (request_argv, cwd) == ([argv[-1], *flags], str(tmp_path))
    assert request_env.items() >= env.items()
    code = expected_exit(ack, result)
    assert done.returncode == (1 if code is None else code), done.stderr
    assert bool(done.stderr) == (code is None), done.stderr


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    "flags",
    [
        ["-namespace", "n", "-address", "{A}", "-id", "x", "delete"],
        ["--address={A}", "-debug", "start"],
        ["-debug=false", "-publish-binary", "/c", "-address", "{A}", "-unknown", "delete"],
        ["-address", "/elsewhere.sock", "-address", "{A}", "-v=false", "--info=0", "start"],
        ["-publish_binary=/c", "---address", "{A}", "delete", "-v"],
    ],
)
def test_clients_find_the_template_of_the_address_flag(
    tmp_path: Path, shim_bin: Path, client: str, flags: list[str]
) -> None:
    """Go flag syntax, read by shim.flags and by the launcher's own parser alike."""
    if os.geteuid() != 0:
        pytest.skip(f"the template socket is under {SOCKET_DIR}, which needs root")
    argv = client_argv(shim_bin, client)
    address = f"/pyshim-template-flags-{os.getpid()}-{client}.sock"
    flags = [flag.replace("{A}", address) for flag in flags]
    template = FakeTemplate(address, argv[-1])
    try:
        answering = ThreadWithResult(template.answer, encode_reply(1), encode_reply(7))
        done = subprocess.run([*argv, *flags], cwd=tmp_path, capture_output=True, timeout=30)
        answering.result()
    finally:
        template.close()
    assert done.returncode == 7, done.stderr
    assert template.requests[0][0] == [argv[-1], *flags]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", CLIENTS)
def test_a_killed_template_is_replaced_and_its_daemons_keep_serving(
    tmp_path: Path, shim_bin: Path, client: str
) -> None:
    shims = Shims(tmp_path, "killed", shim_bin, client)
    started = {"first": shims.start("first")}
    old_template = parent_of(started["first"][1])
    os.kill(old_template, signal.SIGKILL)  # its socket file stays behind, refusing connections
    assert wait_gone(old_template, timeout=10)
    started["second"] = shims.start("second")
    new_template = parent_of(started["second"][1])
    assert new_template not in (old_template, 1)
    assert comm(new_template) == TEMPLATE_COMM
    shims.stop(started)  # the orphaned daemon still answers


def test_a_template_that_cannot_start_removes_its_socket(tmp_path: Path) -> None:
    """Its imports fail (no backend of that name): the next request must not find a socket
    that refuses it."""
    path = str(tmp_path / "pyshim-template-test")
    spawn_template(path, "/nowhere/containerd-shim-nosuchbackend-v1", "/unused.sock")
    assert os.path.exists(path)  # bound before the fork: a concurrent start would queue on it
    deadline = time.monotonic() + 10
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(path)
    with contextlib.suppress(ChildProcessError):  # the failed template was our child
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
