"""Issue 5 against the real shim under a private containerd: load, faults, bad input, security.

The long versions of the load and leak scenarios are in scripts/soak.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message
from harness import PYRUNC_RUNTIME, PrivateContainerd, wait_until
from reliability import (
    container_churn,
    delete_task,
    exec_storm,
    exits,
    lifecycle_leaks,
    socket_of,
)

from shim.api.task.v2 import shim_pb2 as api
from shim.ttrpc import wire
from shim.ttrpc.client import Client
from shim.ttrpc.errors import Code, TtrpcError

TASK = "containerd.task.v2.Task"
FAILPOINT_RUNC = Path(__file__).with_name("failpoint-runc")

pytestmark = pytest.mark.timeout(240)


def init_pid(ctrd: PrivateContainerd, name: str) -> int:
    return int((ctrd.bundle(name) / "init.pid").read_text())


def shim_address(ctrd: PrivateContainerd, name: str) -> str:
    return (ctrd.bundle(name) / "address").read_text().removeprefix("unix://")


def finish(ctrd: PrivateContainerd, name: str, status: int = 137) -> None:
    """Kill (if running) and delete a task and its container; the task exited with status."""
    ctrd.ctr("tasks", "kill", "--signal", "SIGKILL", name, check=False)
    assert wait_until(lambda: delete_task(ctrd, name) == status, timeout=30, interval=0.1)
    ctrd.ctr("containers", "delete", name)


def process_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def no_runc_state(ctrd: PrivateContainerd, name: str) -> bool:
    return not Path("/run/containerd/runc", ctrd.namespace, name).exists()


# -- 1. exit routing under load -----------------------------------------------------------------


def test_exec_storm_routes_every_exit_once_before_the_init_exit(
    containerd: PrivateContainerd,
) -> None:
    assert exec_storm(containerd, execs=200, workers=50) == []


def test_container_churn_routes_every_exit_once(containerd: PrivateContainerd) -> None:
    assert container_churn(containerd, containers=30, workers=10) == []


# -- 2. failpoints ------------------------------------------------------------------------------


@pytest.fixture
def failpoint(containerd: PrivateContainerd) -> Iterator[Callable[[str, str], None]]:
    """Put failpoint-runc first in the shims' PATH (the harness's shim bin dir) for one test;
    the returned function arms `<runc command> <action>` for one container id."""
    runc = containerd.base / "bin" / "runc"
    rules = containerd.base / "failpoints"
    rules.mkdir()
    runc.symlink_to(FAILPOINT_RUNC)

    def arm(container_id: str, rule: str) -> None:
        (rules / container_id).write_text(rule + "\n")

    try:
        yield arm
    finally:
        runc.unlink()
        shutil.rmtree(rules)


def test_init_dying_before_create_returns_is_reported_once(
    containerd: PrivateContainerd, failpoint: Callable[[str, str], None]
) -> None:
    failpoint("early", "create kill-init-after")
    with containerd.events() as log:
        command = ("run", "-d", "--runtime", PYRUNC_RUNTIME, containerd.image, "early")
        result = containerd.ctr(*command, "sleep", "1000", check=False)
        log.wait_for("/tasks/exit", '"id":"early"')
    assert result.returncode != 0
    assert "stopped" in result.stderr, result.stderr
    assert [e["exit_status"] for e in exits(log)] == [137]
    assert "/tasks/start" not in log.topics()
    finish(containerd, "early")
    assert no_runc_state(containerd, "early")


def test_runc_killed_during_create_leaves_nothing(
    containerd: PrivateContainerd, failpoint: Callable[[str, str], None]
) -> None:
    failpoint("cut", "create die-after")
    with containerd.events() as log:
        command = ("run", "-d", "--runtime", PYRUNC_RUNTIME, containerd.image, "cut")
        result = containerd.ctr(*command, "sleep", "1000", check=False)
    assert result.returncode != 0
    assert "OCI runtime create failed" in result.stderr, result.stderr
    assert "/tasks/create" not in log.topics()
    assert "cut" not in containerd.tasks()
    containerd.ctr("containers", "delete", "cut")
    assert wait_until(lambda: no_runc_state(containerd, "cut"), timeout=10)
    # The init runc had created is gone too (the autouse check covers shims and mounts).
    cgroup = f":/{containerd.namespace}/cut"
    assert not [p for p in Path("/proc").glob("[0-9]*/cgroup") if cgroup in read(p)]


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.parametrize("when", ["before", "after"])
def test_exec_racing_the_init_exit(
    containerd: PrivateContainerd, failpoint: Callable[[str, str], None], when: str
) -> None:
    name = f"race-{when}"
    containerd.run_detached(name, "sleep", "1000")
    failpoint(name, f"exec kill-init-{when}")
    with containerd.events() as log:
        result = containerd.ctr(
            "tasks", "exec", "--exec-id", "ex", name, "sleep", "100", check=False
        )
        log.wait_for("/tasks/exit", f'"id":"{name}"')
    seen = [(e["id"], e.get("exit_status", 0)) for e in exits(log)]
    if when == "before":  # runc refuses: the exec never ran, only the init's exit is news
        assert result.returncode != 0
        assert seen == [(name, 137)]
        assert "/tasks/exec-started" not in log.topics()
    else:  # the exec ran and died with its pid namespace: its exit goes first
        assert result.returncode == 137, result.stderr
        assert seen == [("ex", 137), (name, 137)]
    finish(containerd, name)


def test_vanished_fifo_reader_does_not_lose_the_exit(containerd: PrivateContainerd) -> None:
    command = ("run", "--runtime", PYRUNC_RUNTIME, containerd.image, "chatty")
    script = "while :; do echo chatter; done"
    ctr = containerd.start_ctr(
        *command, "sh", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert ctr.stdout is not None
    try:
        assert ctr.stdout.readline() == b"chatter\n"
    finally:
        ctr.kill()  # the reader of the stdout FIFO vanishes mid-stream
        ctr.wait(timeout=10)
    shim = containerd.shim_pids()
    assert containerd.task_status("chatty") == "RUNNING"
    with containerd.events() as log:
        containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "chatty")
        log.wait_for("/tasks/exit", '"id":"chatty"')
    assert [e["exit_status"] for e in exits(log)] == [137]
    assert containerd.shim_pids() == shim
    finish(containerd, "chatty")
    remove_client_fifos(containerd)


# -- 3. containerd killed in a burst ------------------------------------------------------------


def forwarded_exits(ctrd: PrivateContainerd, offset: int, topic: str = "/tasks/exit") -> int:
    """Events on `topic` (any, if empty) shims forwarded to containerd since log byte
    `offset`."""
    with ctrd.log_path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    marks = ("event forwarded", f"ns={ctrd.namespace}", f"topic={topic}")
    return sum(all(m in line for m in marks) for line in text.splitlines())


def test_containerd_sigkill_in_a_burst_loses_no_task_and_no_exit(
    containerd: PrivateContainerd,
) -> None:
    containerd.run_detached("base", "sleep", "100000")
    offset = containerd.log_path.stat().st_size
    launched: list[str] = []
    enough = threading.Event()
    count = 16

    def launch(n: int) -> None:
        # Long enough to outlive the launches, short enough to exit while containerd is down.
        script = f"sleep 5; exit {n}"
        if n % 2:
            args = ["run", "-d", "--runtime", PYRUNC_RUNTIME, containerd.image, f"b{n}"]
        else:
            args = ["tasks", "exec", "-d", "--exec-id", f"e{n}", "base"]
        if containerd.ctr(*args, "sh", "-c", script, check=False, timeout=60).returncode == 0:
            launched.append(f"b{n}" if n % 2 else f"e{n}")
            if len(launched) >= count // 2:
                enough.set()

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        burst = [pool.submit(launch, n) for n in range(1, count + 1)]
        assert enough.wait(timeout=60)
        containerd.restart(signal.SIGKILL, down_for=6)
        for future in burst:
            future.result()

    acked = {i for i in launched if i.startswith("b")}
    assert acked <= set(containerd.tasks())  # no task lost
    # An acked task ran and exits; one whose Create completed in the shim while containerd
    # died was never started, and stays CREATED as it would with the Go shim.
    assert wait_until(
        lambda: all(
            t.status == "STOPPED" or (t.status == "CREATED" and i not in acked)
            for i, t in containerd.tasks().items()
            if i != "base"
        ),
        timeout=30,
    )
    started = [i for i, t in containerd.tasks().items() if i != "base" and t.status == "STOPPED"]
    exec_status = asyncio.run(exec_exits(shim_address(containerd, "base"), count))
    assert {i for i in launched if i.startswith("e")} <= set(exec_status)
    assert all(exec_status[i] == int(i[1:]) for i in exec_status)
    # Every exit reached containerd once, including those queued while it was down. Only a
    # containerd that logs each forwarded event shows it (1.6 and 2.x do at debug level;
    # 1.7 does not); the statuses above and below are checked on every version.
    if forwarded_exits(containerd, 0, topic="") > 0:
        expected = len(started) + len(exec_status)
        assert wait_until(lambda: forwarded_exits(containerd, offset) >= expected, timeout=20)
        assert forwarded_exits(containerd, offset) == expected
    for name in started:
        assert delete_task(containerd, name) == int(name[1:])
    finish(containerd, "base")
    containerd.remove_all()
    # A shim whose Create the crash cut never gets a Shutdown: it exits by itself once it has
    # held no container for shim.daemon.ABANDONED_AFTER (30 s, checked every 10 s).
    shut_down = wait_until(lambda: not containerd.shim_pids(), timeout=50)
    leaked = containerd.shim_pids()
    containerd.force_clean()  # reported here, not again by the autouse check
    assert shut_down, f"shims never shut down: {leaked}"


async def exec_exits(address: str, count: int) -> dict[str, int]:
    """exec id -> exit status of the execs e<n> of `base` that ran, asked of the shim."""
    found = {}
    async with await Client.connect(address) as client:
        for n in range(2, count + 1, 2):
            request = api.StateRequest(id="base", exec_id=f"e{n}")
            try:
                state = await client.call(TASK, "State", request, api.StateResponse, timeout=10)
            except TtrpcError as error:
                assert error.code is Code.NOT_FOUND
                continue
            if state.pid:
                found[f"e{n}"] = state.exit_status
    return found


# -- 4. the shim killed -------------------------------------------------------------------------


def test_shim_sigkill_reports_137_and_delete_cleans_up(containerd: PrivateContainerd) -> None:
    containerd.run_detached("orphan", "sleep", "1000")
    pid = init_pid(containerd, "orphan")
    sock = socket_of(containerd, "orphan")
    assert sock.exists()
    with containerd.events() as log:
        for shim in containerd.shim_pids():
            os.kill(shim, signal.SIGKILL)
        event = log.wait_for("/tasks/exit", '"container_id":"orphan"', timeout=30)
    assert '"exit_status":137' in event
    assert wait_until(lambda: process_gone(pid), timeout=10)
    assert not sock.exists()
    assert "orphan" not in containerd.tasks()
    containerd.ctr("containers", "delete", "orphan")
    assert no_runc_state(containerd, "orphan")
    remove_client_fifos(containerd)  # ctr removes them at `tasks delete`: no task left to delete


def remove_client_fifos(ctrd: PrivateContainerd) -> None:
    """FIFO dirs that ctr made and would have removed had it not been killed (or not needed)."""
    for fifo_dir in ctrd.fifo_dir.iterdir():
        shutil.rmtree(fifo_dir)


# -- 5. leaks ------------------------------------------------------------------------------------


def test_fifty_lifecycles_leak_nothing(containerd: PrivateContainerd) -> None:
    assert lifecycle_leaks(containerd, lifecycles=50, workers=5) == []


# -- 6. bad input at the RPC layer --------------------------------------------------------------


def exchange(address: str, data: bytes) -> tuple[int, str] | None:
    """Send raw bytes and hang up; the (code, message) of the first response, None if the
    shim closed without one."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            received += chunk
            if len(received) >= wire.HEADER_LENGTH:
                length = wire.decode_header(received).length
                if len(received) >= wire.HEADER_LENGTH + length:
                    code, message, _ = wire.decode_response(received[wire.HEADER_LENGTH :])
                    return code, message


def state_frame(stream_id: int, payload: bytes) -> bytes:
    return wire.request_frame(stream_id, TASK, "State", payload)


def raw_frame(stream_id: int, message_type: int, body: bytes, length: int | None = None) -> bytes:
    """A frame as given, whatever it holds; `length` may lie about the body."""
    return (
        wire.encode_header(len(body) if length is None else length, stream_id, message_type) + body
    )


async def call(address: str, method: str, request: Message) -> tuple[Code, str]:
    async with await Client.connect(address) as client:
        try:
            await client.call(TASK, method, request, api.StateResponse, timeout=20)
        except TtrpcError as error:
            return error.code, error.message
    return Code.OK, ""


def exec_request(exec_id: str, spec: bytes = b'{"args": ["true"], "cwd": "/"}') -> Message:
    return api.ExecProcessRequest(id="victim", exec_id=exec_id, spec=AnyProto(value=spec))


def test_bad_rpc_input_gets_the_right_code_and_the_shim_keeps_serving(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    containerd.run_detached("victim", "sleep", "1000")
    address = shim_address(containerd, "victim")
    state = api.StateRequest(id="victim").SerializeToString()
    bare = tmp_path / "bare"
    bare.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")

    frames: list[tuple[str, bytes, tuple[int, str] | None]] = [
        ("unknown frame type, then a good call", raw_frame(1, 9, b"") + state_frame(3, state),
         (Code.OK, "")),
        ("not a ttrpc.Request", raw_frame(1, wire.MessageType.REQUEST, b"\xff\xff\xff"),
         (Code.INVALID_ARGUMENT, "unmarshal request error")),
        ("even stream id", state_frame(2, state), (Code.INVALID_ARGUMENT, "")),
        ("payload of the wrong type", state_frame(1, b"\x0a\xff\x01"),
         (Code.INTERNAL, "error unmarshalling payload")),  # as Go ttrpc
        ("unknown method", wire.request_frame(1, TASK, "Nope"),
         (Code.UNIMPLEMENTED, "Nope")),
        ("oversized frame", raw_frame(1, 1, bytes(wire.MAX_MESSAGE_SIZE + 1)),
         (Code.RESOURCE_EXHAUSTED, "exceed maximum message size")),
        ("4 GiB length, then hang up", raw_frame(1, 1, b"x" * 100, length=2**32 - 1), None),
        ("half a header, then hang up", b"\x00\x00", None),
    ]  # fmt: skip
    for what, data, want in frames:
        got = exchange(address, data)
        if want is None:
            assert got is None, what
        else:
            assert got is not None and got[0] == want[0] and want[1] in got[1], (what, got)

    calls: list[tuple[str, str, Message, Code, str]] = [
        ("id with ..", "Create", api.CreateTaskRequest(id="../evil", bundle=str(bare)),
         Code.INVALID_ARGUMENT, "invalid container id"),
        ("id with /", "Create", api.CreateTaskRequest(id="a/b", bundle=str(bare)),
         Code.INVALID_ARGUMENT, "invalid container id"),
        ("bundle without config.json", "Create", api.CreateTaskRequest(id="bare", bundle=str(bare)),
         Code.INVALID_ARGUMENT, "no config.json"),
        ("broken config.json", "Create", api.CreateTaskRequest(id="broken", bundle=str(broken)),
         Code.UNKNOWN, "OCI runtime create failed"),
        ("exec id with ..", "Exec", exec_request(".."), Code.INVALID_ARGUMENT, "invalid exec id"),
        ("exec id escaping", "Exec", exec_request("../x"), Code.INVALID_ARGUMENT, "invalid exec"),
        ("exec spec not JSON", "Exec", exec_request("j", b"\x00nope"),
         Code.INVALID_ARGUMENT, "not valid JSON"),
        ("exec spec not an object", "Exec", exec_request("k", b"[1]"),
         Code.INVALID_ARGUMENT, "JSON object"),
        ("state of ../victim", "State", api.StateRequest(id="../victim"), Code.NOT_FOUND, ""),
        ("absurd signal", "Kill", api.KillRequest(id="victim", signal=99999),
         Code.INVALID_ARGUMENT, "signal"),
        ("signal 2**32-1", "Kill", api.KillRequest(id="victim", signal=2**32 - 1),
         Code.INVALID_ARGUMENT, "signal"),
    ]  # fmt: skip
    for what, method, request, code, text in calls:
        got_code, message = asyncio.run(call(address, method, request))
        assert got_code == code and text in message, (what, got_code, message)

    # Nothing was written outside the bundles, and the victim still runs and answers.
    assert not (containerd.bundle("victim").parent.parent / "evil").exists()
    assert sorted(p.name for p in bare.iterdir()) == []
    assert containerd.task_status("victim") == "RUNNING"
    assert asyncio.run(call(address, "State", api.StateRequest(id="victim"))) == (Code.OK, "")
    finish(containerd, "victim")


# -- 7. security ---------------------------------------------------------------------------------


def unix_sockets() -> dict[int, str]:
    """inode -> path of every unix socket in our network namespace ('@...' for abstract)."""
    found = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        found[int(fields[6])] = fields[7] if len(fields) > 7 else ""
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = read_link(fd)
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def read_link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


CONNECT_AS_NOBODY = """
import ctypes, os, socket, sys
if sys.argv[2] == "keep-fs-root":
    os.setresuid(65534, 65534, 0)
    ctypes.CDLL(None).setfsuid(0)  # the file system lets us in; SO_PEERCRED says uid 65534
else:
    os.setresuid(65534, 65534, 65534)
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("connect refused")
    sys.exit(0)
try:
    sock.sendall(bytes.fromhex(sys.argv[3]))
    print("answered" if sock.recv(65536) else "closed without service")
except (BrokenPipeError, ConnectionResetError):
    print("closed without service")
"""


def test_shim_socket_is_root_only_and_refuses_other_uids(containerd: PrivateContainerd) -> None:
    containerd.run_detached("guarded", "sleep", "1000")
    address = shim_address(containerd, "guarded")
    path = Path(address)
    assert path.parent == Path("/run/containerd/s")
    mode = path.stat()
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600
    assert mode.st_uid == 0
    directory = path.parent.stat()
    assert directory.st_uid == 0 and stat.S_IMODE(directory.st_mode) & 0o077 == 0

    (shim,) = containerd.shim_pids()
    names = unix_sockets()
    shim_sockets = [names.get(inode, "") for inode in socket_inodes(shim)]
    assert address in shim_sockets
    assert not [name for name in shim_sockets if name.startswith("@")]  # CVE-2020-15257

    frame = state_frame(1, api.StateRequest(id="guarded").SerializeToString()).hex()
    for mode_name, want in (("drop-all", "connect refused"), ("keep-fs-root", "closed without")):
        result = subprocess.run(
            [sys.executable, "-c", CONNECT_AS_NOBODY, address, mode_name, frame],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert result.stdout.startswith(want), (mode_name, result.stdout, result.stderr)
    assert containerd.task_status("guarded") == "RUNNING"
    finish(containerd, "guarded")


def test_host_network_container_cannot_reach_the_shim(containerd: PrivateContainerd) -> None:
    command = ("run", "-d", "--net-host", "--runtime", PYRUNC_RUNTIME, containerd.image, "hostnet")
    containerd.ctr(*command, "sleep", "1000")
    address = shim_address(containerd, "hostnet")
    probe = f"test -e {address} || test -e /run/containerd/s || echo hidden; cat /proc/net/unix"
    result = containerd.ctr("tasks", "exec", "--exec-id", "probe", "hostnet", "sh", "-c", probe)
    # It shares the host's network namespace, so it lists the shim socket's name, but the path
    # is not in its mount namespace, and the shim has no abstract socket it could use instead.
    assert result.stdout.startswith("hidden\n")
    assert address in result.stdout
    assert "@" + Path(address).name not in result.stdout
    shim_sockets = socket_inodes(containerd.shim_pids()[0])
    assert not socket_inodes(init_pid(containerd, "hostnet")) & shim_sockets  # no inherited fd
    finish(containerd, "hostnet")
