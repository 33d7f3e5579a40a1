"""The short-lived commands: flags, socket naming, `start` and `delete` as containerd runs them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty

from shim.api.task.v2 import shim_pb2 as api
from shim.flags import parse_flags
from shim.manager import SOCKET_DIR, _group_members, grouping_id, socket_path
from shim.ttrpc.client import Client

SHIM = str(Path(sys.executable).with_name("containerd-shim-pyrunc-v1"))
TASK = "containerd.task.v2.Task"


def test_flags_in_the_order_containerd_sends_them() -> None:
    argv = (
        "-namespace ns -address /run/c.sock -publish-binary /usr/bin/containerd -id t1 -debug start"
    )
    flags, unknown = parse_flags(argv.split())
    assert (flags.namespace, flags.address, flags.id, flags.debug) == (
        "ns",
        "/run/c.sock",
        "t1",
        True,
    )
    assert (flags.publish_binary, flags.action, unknown) == ("/usr/bin/containerd", "start", [])


def test_flags_accept_equals_double_dash_and_unknown_flags() -> None:
    flags, unknown = parse_flags(
        ["--namespace=a", "-debug=false", "-future", "-bundle", "/b", "delete"]
    )
    assert (flags.namespace, flags.debug, flags.bundle, flags.action) == (
        "a",
        False,
        "/b",
        "delete",
    )
    assert unknown == ["future"]


def test_socket_path_is_the_reference_shims_hash() -> None:
    expected = hashlib.sha256(b"/run/containerd/containerd.sock/default/mytask").hexdigest()
    path = socket_path("/run/containerd/containerd.sock", "default", "mytask")
    assert path == f"{SOCKET_DIR}/{expected}"
    assert len("unix://" + path) == 89  # what the Go shim prints, well under sun_path's limit


def test_grouping_id_follows_the_annotations(tmp_path: Path) -> None:
    assert grouping_id(str(tmp_path), "t1") == "t1"  # no config.json
    spec = {"annotations": {"io.kubernetes.cri.sandbox-id": "pod"}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert grouping_id(str(tmp_path), "t1") == "pod"
    spec["annotations"]["io.containerd.runc.v2.group"] = "group"
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert grouping_id(str(tmp_path), "t1") == "group"


def test_group_members_are_the_bundles_beside_of_the_same_group(tmp_path: Path) -> None:
    def bundle(task_id: str, pod: str | None) -> str:
        (tmp_path / task_id).mkdir()
        annotations = {"io.kubernetes.cri.sandbox-id": pod} if pod else {}
        (tmp_path / task_id / "config.json").write_text(json.dumps({"annotations": annotations}))
        return str(tmp_path / task_id)

    pod = bundle("pod", "pod")
    app = bundle("app", "pod")
    bundle("other-pod", "other-pod")
    bundle("other-app", "other-pod")
    plain = bundle("plain", None)

    assert _group_members(pod, "pod") == [("app", app)]
    assert _group_members(app, "app") == [("pod", pod)]
    assert _group_members(plain, "plain") == []


def run_shim(bundle: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "TTRPC_ADDRESS": str(bundle / "no-containerd.sock.ttrpc")}
    return subprocess.run(
        [SHIM, *args], cwd=bundle, input=stdin, capture_output=True, timeout=30, env=env
    )


@pytest.mark.timeout(60)
def test_delete_prints_only_a_delete_response_and_can_run_twice(tmp_path: Path) -> None:
    flags = ["-namespace", "pyshim-unit", "-address", "/nonexistent.sock", "-id", "gone"]
    for _ in range(2):
        result = run_shim(tmp_path, *flags, "-bundle", str(tmp_path), "delete")
        assert result.returncode == 0, result.stderr
        response = api.DeleteResponse.FromString(result.stdout)
        assert (response.pid, response.exit_status) == (0, 137)
        assert response.exited_at.seconds > 0


@pytest.mark.timeout(60)
def test_start_serves_until_shutdown_and_removes_its_socket(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"start binds under {SOCKET_DIR}, which needs root")
    (tmp_path / "config.json").write_text("{}")
    address = f"/pyshim-unit-{os.getpid()}.sock"
    flags = ["-namespace", "pyshim-unit", "-address", address, "-id", "t1"]

    started = run_shim(tmp_path, *flags, "start")

    assert started.returncode == 0, started.stderr
    printed = started.stdout.decode()
    assert printed == "unix://" + socket_path(address, "pyshim-unit", "t1")
    assert (tmp_path / "address").read_text() == printed
    daemon = int((tmp_path / "shim.pid").read_text())
    path = printed.removeprefix("unix://")
    assert os.stat(path).st_mode & 0o777 == 0o600

    again = run_shim(tmp_path, *flags, "start")  # a live shim at that address is reused
    assert (again.returncode, again.stdout.decode()) == (0, printed)

    async def talk() -> int:
        client = await Client.connect(path)
        try:
            connected = await client.call(
                TASK, "Connect", api.ConnectRequest(id="t1"), api.ConnectResponse, timeout=5
            )
            await client.call(TASK, "Shutdown", api.ShutdownRequest(id="t1"), Empty, timeout=5)
            return int(connected.shim_pid)
        finally:
            await client.close()

    assert asyncio.run(talk()) == daemon
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{daemon}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{daemon}")
    assert not os.path.exists(path)
