"""The warm template: `start` and `delete` are relayed to one template, which forks the daemons
and exits when idle."""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty

from shim.api.task.v2 import shim_pb2 as api
from shim.relay import SOCKET_DIR, decode_request, encode_request, relay, template_path
from shim.template import IDLE_EXIT, TEMPLATE_COMM, spawn_template
from shim.ttrpc.client import Client

SHIM = str(Path(sys.executable).with_name("containerd-shim-pyrunc-v1"))
TASK = "containerd.task.v2.Task"


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


@pytest.mark.timeout(60)
def test_daemons_share_one_template_which_exits_when_idle(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"start binds under {SOCKET_DIR}, which needs root")
    address = f"/pyshim-template-unit-{os.getpid()}.sock"
    env = {"PATH": os.environ["PATH"], "TTRPC_ADDRESS": address + ".ttrpc"}
    daemons, addresses = [], []
    for task_id in ("a", "b"):
        bundle = tmp_path / task_id
        bundle.mkdir()
        (bundle / "config.json").write_text("{}")
        argv = [SHIM, "-namespace", "unit", "-address", address, "-id", task_id, "start"]
        started = subprocess.run(
            argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )
        assert started.returncode == 0, started.stderr
        addresses.append(started.stdout.decode())
        daemons.append(int((bundle / "shim.pid").read_text()))

    template = parent_of(daemons[0])
    assert parent_of(daemons[1]) == template
    assert comm(template) == TEMPLATE_COMM
    assert comm(daemons[0]) != TEMPLATE_COMM

    # `delete` (here of a never-created container) runs warm and prints a DeleteResponse.
    deleted = subprocess.run(
        [SHIM, "-namespace", "unit", "-address", address, "-id", "a", "delete"],
        cwd=tmp_path / "a",
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert deleted.returncode == 0, deleted.stderr
    assert api.DeleteResponse.FromString(deleted.stdout).exit_status == 137

    for task_id, printed in zip(("a", "b"), addresses, strict=True):
        asyncio.run(shutdown(printed, task_id))
    assert all(wait_gone(pid, timeout=10) for pid in daemons)
    assert wait_gone(template, timeout=IDLE_EXIT + 10)


def test_relay_request_round_trips_and_rejects_malformed_ones() -> None:
    argv, env = [SHIM, "-id", "x", "start"], {"PATH": "/bin"}
    assert decode_request(encode_request(argv, "/b", env)) == (argv, "/b", env)
    for bad in ((SHIM, "/b", env), ([], "/b", env), ([SHIM], 7, env), ([SHIM], "/b", [])):
        with pytest.raises(ValueError):
            decode_request(marshal.dumps(bad))


@pytest.mark.timeout(60)
def test_template_survives_malformed_requests(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"start binds under {SOCKET_DIR}, which needs root")
    address = f"/pyshim-template-unit-{os.getpid()}-bad.sock"
    env = {"PATH": os.environ["PATH"], "TTRPC_ADDRESS": address + ".ttrpc"}

    def start(task_id: str) -> subprocess.CompletedProcess[bytes]:
        bundle = tmp_path / task_id
        bundle.mkdir()
        (bundle / "config.json").write_text("{}")
        argv = [SHIM, "-namespace", "unit", "-address", address, "-id", task_id, "start"]
        return subprocess.run(
            argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )

    first = start("first")
    assert first.returncode == 0, first.stderr
    path = template_path(address, SHIM)
    garbage = [
        (b"\x00not marshal", True),  # undecodable, with descriptors
        (marshal.dumps(([SHIM, "start"], "/", {})), False),  # no descriptors
        (marshal.dumps("a string"), True),
    ]
    for payload, with_fds in garbage:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(10)
            conn.connect(path)
            fds = [0, 1, 2] if with_fds else []
            socket.send_fds(conn, [payload], fds)
            assert conn.recv(100) == b""  # refused: no ack, nothing done
    second = start("second")
    assert second.returncode == 0, second.stderr
    daemons = [int((tmp_path / t / "shim.pid").read_text()) for t in ("first", "second")]
    assert parent_of(daemons[0]) == parent_of(daemons[1])  # the same template served both
    for task_id, started in (("first", first), ("second", second)):
        asyncio.run(shutdown(started.stdout.decode(), task_id))
    assert all(wait_gone(pid, timeout=10) for pid in daemons)


def test_relay_declines_when_the_program_is_not_run_by_its_path() -> None:
    # No template can be keyed for it: main() then does the command in its own process.
    assert relay(["no-such-shim-program", "-id", "x", "delete"], "/unused.sock") is None


@pytest.mark.timeout(60)
def test_a_killed_template_is_replaced_and_its_daemons_keep_serving(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"start binds under {SOCKET_DIR}, which needs root")
    address = f"/pyshim-template-unit-{os.getpid()}-killed.sock"
    env = {"PATH": os.environ["PATH"], "TTRPC_ADDRESS": address + ".ttrpc"}

    def start(task_id: str) -> tuple[str, int]:
        bundle = tmp_path / task_id
        bundle.mkdir()
        (bundle / "config.json").write_text("{}")
        argv = [SHIM, "-namespace", "unit", "-address", address, "-id", task_id, "start"]
        started = subprocess.run(
            argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )
        assert started.returncode == 0, started.stderr
        return started.stdout.decode(), int((bundle / "shim.pid").read_text())

    first_address, first = start("first")
    old_template = parent_of(first)
    os.kill(old_template, signal.SIGKILL)  # its socket file stays behind, refusing connections
    assert wait_gone(old_template, timeout=10)
    second_address, second = start("second")
    assert parent_of(second) not in (old_template, 1)
    assert comm(parent_of(second)) == TEMPLATE_COMM
    for task_id, printed in (("first", first_address), ("second", second_address)):
        asyncio.run(shutdown(printed, task_id))  # the orphaned daemon still answers
    assert all(wait_gone(pid, timeout=10) for pid in (first, second))


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
