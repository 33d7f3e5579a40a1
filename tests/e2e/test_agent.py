"""The guest agent on the host: `python -m shim.agent --listen` with a private runc root and a
busybox rootfs, driven through AgentClient as the VM backend's host shim will drive it over its
virtio-serial port. Needs root and runc; no containerd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import ensure_image

from shim.agent.client import AgentClient
from shim.api.agent.v1 import agent_pb2 as api
from shim.api.cgroups.v1 import metrics_pb2 as v1_metrics
from shim.api.cgroups.v2 import metrics_pb2 as v2_metrics
from shim.sys.cgroups import V1_METRICS_URL, V2_METRICS_URL
from shim.ttrpc.errors import Code, ConnectionClosed, TtrpcError

REPO = Path(__file__).resolve().parents[2]
CGROUP_PARENT = "pyshim-agent-test"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
]


@pytest.fixture(autouse=True)
def clean_containerd() -> None:
    """No containerd here: the e2e conftest's per-test containerd check does not apply."""


@dataclass
class Agent:
    socket: str
    process: subprocess.Popen[bytes]
    base: Path
    rootfs: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        assert self.process.returncode == 0, self.process.returncode


def unpack_busybox(target: Path) -> None:
    with tarfile.open(ensure_image()) as image:
        index = _json_member(image, "index.json")
        manifest = _json_member(image, _blob(index["manifests"][0]["digest"]))
        for layer in manifest["layers"]:
            blob = image.extractfile(_blob(layer["digest"]))
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r:*") as layer_tar:
                layer_tar.extractall(target)  # our own image (scripts/build-image)


def _blob(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/")


def _json_member(tar: tarfile.TarFile, name: str) -> Any:
    member = tar.extractfile(name)
    assert member is not None, name
    return json.load(member)


def start_agent(base: Path, rootfs: Path) -> Agent:
    sock = base / "agent.sock"
    argv = [sys.executable, "-m", "shim.agent", "--listen", str(sock)]
    argv += ["--state-dir", str(base / "state"), "--runtime-root", str(base / "runc"), "--debug"]
    log = open(base / "agent.log", "ab")  # noqa: SIM115 - the agent's stderr, kept open by it
    process = subprocess.Popen(argv, cwd=REPO, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    return Agent(str(sock), process, base, rootfs)


def leftovers(agent: Agent) -> list[str]:
    """Processes in the rootfs, mounts under the agent's directory, runc or bundle state."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/root") == str(agent.rootfs):
                found.append(f"process {pid} in the rootfs")
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if str(agent.base) in line]
    for state in (agent.base / "runc" / "agent", agent.base / "state"):
        if state.is_dir():
            found += [f"state {entry}" for entry in os.listdir(state)]
    return found


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("agent-rootfs") / "rootfs"
    target.mkdir()
    unpack_busybox(target)
    return target


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[Agent]:
    running = start_agent(tmp_path_factory.mktemp("agent"), rootfs)
    try:
        yield running
    finally:
        running.stop()
        remove_cgroup_parent()
    assert leftovers(running) == []


def remove_cgroup_parent() -> None:
    """runc removes each container's cgroup, not the parent it made for them."""
    for parent in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"):
        with contextlib.suppress(OSError):
            parent.rmdir()
    with contextlib.suppress(OSError):
        Path("/sys/fs/cgroup", CGROUP_PARENT).rmdir()  # a v2 host


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("spec")
    subprocess.run(["runc", "spec"], cwd=directory, check=True)
    spec: dict[str, Any] = json.loads((directory / "config.json").read_text())
    return spec


def spec_for(base: dict[str, Any], cid: str, *args: str, terminal: bool = False) -> dict[str, Any]:
    spec = json.loads(json.dumps(base))
    spec["process"]["args"] = list(args)
    spec["process"]["terminal"] = terminal
    spec["root"]["readonly"] = True
    spec["linux"]["cgroupsPath"] = f"/{CGROUP_PARENT}/{cid}"
    return spec


def run(agent: Agent, body: Callable[[AgentClient], Awaitable[None]], timeout: float = 90) -> None:
    async def main() -> None:
        async with asyncio.timeout(timeout):
            client = await AgentClient.connect(agent.socket, timeout=30)
            try:
                await body(client)
            finally:
                await client.close()

    asyncio.run(main())


async def read_all(client: AgentClient, cid: str, exec_id: str = "", *, err: bool = False) -> bytes:
    read = client.read_stderr if err else client.read_stdout
    data = b""
    while chunk := await read(cid, exec_id, len(data)):
        data += chunk
    return data


STDIO_OUT = api.Stdio(stdout=True, stderr=True)
STDIO_ALL = api.Stdio(stdin=True, stdout=True, stderr=True)
STDIO_NONE = api.Stdio()


async def create_started(
    client: AgentClient, agent: Agent, spec: dict[str, Any], cid: str, stdio: api.Stdio
) -> int:
    pid = await client.create_container(cid, spec, str(agent.rootfs), stdio)
    await client.start_container(cid)
    return pid


def test_output_exact_bytes_and_exit_code(agent: Agent, base_spec: dict[str, Any]) -> None:
    script = "printf 'out\\000put'; printf 'err\\nors' >&2; exit 3"

    async def body(client: AgentClient) -> None:
        spec = spec_for(base_spec, "out", "sh", "-c", script)
        pid = await create_started(client, agent, spec, "out", STDIO_OUT)
        assert pid > 0
        stdout, stderr, waited = await asyncio.gather(
            read_all(client, "out"), read_all(client, "out", err=True), client.wait_process("out")
        )
        assert (stdout, stderr) == (b"out\0put", b"err\nors")
        assert waited.exit_status == 3
        assert waited.exited_at.seconds > 0
        await client.remove_container("out")
        with pytest.raises(TtrpcError) as missing:
            await client.wait_process("out")
        assert missing.value.code == Code.NOT_FOUND

    run(agent, body)


def test_stdin_to_cat_and_close(agent: Agent, base_spec: dict[str, Any]) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: more than a pipe holds, so writes wait

    async def body(client: AgentClient) -> None:
        await create_started(client, agent, spec_for(base_spec, "cat", "cat"), "cat", STDIO_ALL)

        async def feed() -> None:
            offset = 0
            for start in range(0, len(data), 100_000):
                chunk = data[start : start + 100_000]
                offset = await client.write_stdin("cat", "", offset, chunk)
            # A repeated write (its reply lost, say) is not applied twice.
            assert await client.write_stdin("cat", "", 0, data[:10]) == len(data)
            await client.close_stdin("cat")

        _, echoed = await asyncio.gather(feed(), read_all(client, "cat"))
        assert echoed == data
        assert (await client.wait_process("cat")).exit_status == 0
        await client.remove_container("cat")

    run(agent, body)


def test_terminal_with_resize(agent: Agent, base_spec: dict[str, Any]) -> None:
    async def body(client: AgentClient) -> None:
        spec = spec_for(base_spec, "tty", "sh", "-c", "read go; stty size", terminal=True)
        stdio = api.Stdio(stdin=True, stdout=True, terminal=True)
        await create_started(client, agent, spec, "tty", stdio)
        await client.tty_win_resize("tty", "", rows=40, columns=100)
        await client.write_stdin("tty", "", 0, b"go\n")
        output = await read_all(client, "tty")
        assert b"40 100" in output
        assert (await client.wait_process("tty")).exit_status == 0
        await client.remove_container("tty")

    run(agent, body)


def test_exec_signal_one_then_all(agent: Agent, base_spec: dict[str, Any]) -> None:
    async def body(client: AgentClient) -> None:
        spec = spec_for(base_spec, "sig", "sleep", "1000")
        await create_started(client, agent, spec, "sig", STDIO_NONE)
        process = dict(spec["process"], args=["sh", "-c", "echo exec; exec sleep 1000"])
        pid = await client.exec_process("sig", "e1", process, STDIO_OUT)
        assert await client.read_stdout("sig", "e1", 0) == b"exec\n"
        pids = {p.pid: p.exec_id for p in await client.list_pids("sig")}
        assert pids[pid] == "e1" and len(pids) == 2
        with pytest.raises(TtrpcError) as running:
            await client.remove_process("sig", "e1")
        assert running.value.code == Code.FAILED_PRECONDITION
        await client.signal_process("sig", "e1", signal.SIGTERM)
        assert (await client.wait_process("sig", "e1")).exit_status == 128 + signal.SIGTERM
        await client.remove_process("sig", "e1")
        await client.exec_process("sig", "e2", dict(process, args=["sleep", "1000"]), STDIO_NONE)
        await client.signal_process("sig", "", signal.SIGKILL, all=True)
        init, e2 = await asyncio.gather(
            client.wait_process("sig"), client.wait_process("sig", "e2")
        )
        assert init.exit_status == e2.exit_status == 128 + signal.SIGKILL
        await client.remove_container("sig")

    run(agent, body)


def test_pause_resume_stats_update(agent: Agent, base_spec: dict[str, Any]) -> None:
    async def body(client: AgentClient) -> None:
        spec = spec_for(base_spec, "ctl", "sleep", "1000")
        await create_started(client, agent, spec, "ctl", STDIO_NONE)
        await client.pause_container("ctl")
        with pytest.raises(TtrpcError):
            await client.pause_container("ctl")
        await client.resume_container("ctl")
        limit = 64 << 20
        await client.update_container("ctl", {"memory": {"limit": limit}})
        stats = await client.stats_container("ctl")
        if stats.type_url == V1_METRICS_URL:
            v1 = v1_metrics.Metrics.FromString(stats.value)
            assert v1.memory.usage.limit == limit
            assert v1.pids.current == 1
        else:
            assert stats.type_url == V2_METRICS_URL
            v2 = v2_metrics.Metrics.FromString(stats.value)
            assert v2.memory.usage_limit == limit
            assert v2.pids.current == 1
        await client.signal_process("ctl", "", signal.SIGKILL)
        await client.wait_process("ctl")
        await client.remove_container("ctl")

    run(agent, body)


def test_oom_is_recorded_before_the_exit(agent: Agent, base_spec: dict[str, Any]) -> None:
    async def body(client: AgentClient) -> None:
        spec = spec_for(base_spec, "oom", "tail", "/dev/zero")
        limit = 32 << 20
        spec["linux"]["resources"] = {"memory": {"limit": limit, "swap": limit}}
        oom = asyncio.ensure_future(client.wait_oom(0))
        await create_started(client, agent, spec, "oom", STDIO_NONE)
        waited = await client.wait_process("oom")
        assert waited.exit_status == 128 + signal.SIGKILL
        assert waited.oom_sequence >= 1  # the host reports the OOM first
        event = await oom
        assert event.container_id == "oom" and event.sequence <= waited.oom_sequence
        # Asked again (a reply lost with its connection), the same event comes back.
        assert await client.wait_oom(event.sequence - 1) == event
        await client.remove_container("oom")

    run(agent, body)


def test_reconnect_mid_output_loses_nothing(agent: Agent, base_spec: dict[str, Any]) -> None:
    # The init outlives the cat exec: its exit would kill every process of the container.
    script = "i=0; while [ $i -lt 20000 ]; do echo line$i; i=$((i+1)); done; exec sleep 600"
    expected = b"".join(b"line%d\n" % i for i in range(20000))
    received = bytearray()

    async def first(client: AgentClient) -> None:
        spec = spec_for(base_spec, "re", "sh", "-c", script)
        await create_started(client, agent, spec, "re", STDIO_OUT)
        received.extend(await client.read_stdout("re", "", 0, max_bytes=1000))
        # A read still waiting when the connection goes: its data must not go with it.
        await client.exec_process("re", "cat", dict(spec["process"], args=["cat"]), STDIO_ALL)
        pending = asyncio.ensure_future(client.read_stdout("re", "cat", 0))
        await asyncio.sleep(0)
        await client.close()
        with pytest.raises(ConnectionClosed):
            await pending

    async def second(client: AgentClient) -> None:
        await client.write_stdin("re", "cat", 0, b"kept\n")
        assert await client.read_stdout("re", "cat", 0) == b"kept\n"
        await client.close_stdin("re", "cat")
        assert await read_all(client, "re", "cat") == b"kept\n"
        while len(received) < len(expected):
            received.extend(await client.read_stdout("re", "", len(received)))
        assert bytes(received) == expected
        await client.signal_process("re", "", signal.SIGKILL)
        assert (await client.wait_process("re")).exit_status == 128 + signal.SIGKILL
        assert await client.read_stdout("re", "", len(received)) == b""
        await client.remove_container("re")

    run(agent, first)
    run(agent, second)


def test_host_first_then_agent_and_shutdown_cleans_up(
    tmp_path: Path, rootfs: Path, base_spec: dict[str, Any]
) -> None:
    """A host that connects before the agent listens waits for it; an agent stopped with
    containers still running kills and removes them."""

    async def main() -> None:
        sock = str(tmp_path / "agent.sock")
        connecting = asyncio.ensure_future(AgentClient.connect(sock, timeout=60))
        await asyncio.sleep(0.2)
        assert not connecting.done()
        late = start_agent(tmp_path, rootfs)
        try:
            async with await connecting as client:
                spec = spec_for(base_spec, "left", "sleep", "1000")
                await create_started(client, late, spec, "left", STDIO_OUT)
                await client.exec_process("left", "x", dict(spec["process"]), STDIO_NONE)
        finally:
            await asyncio.to_thread(late.stop)
        assert leftovers(late) == []

    asyncio.run(main())
