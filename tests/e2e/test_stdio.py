"""Stdio of containerd-shim-pyrunc-v1 end to end (issue 4): logging binaries, file://, terminals,
CloseIO, bulk output and readers that go away, through a real containerd, ctr and runc."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from harness import PrivateContainerd, wait_until

from shim.api.task.v2 import shim_pb2 as api
from shim.ttrpc.client import Client

RUNTIME = "io.containerd.pyrunc.v1"
TASK = "containerd.task.v2.Task"
PROCESS_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"

pytestmark = pytest.mark.timeout(120)

# A logging binary that records what it was given: argv pairs, its initial environment, what
# fds 0-2 are, and every byte of fds 3 and 4 until both end. It signals ready on fd 5 by
# writing a byte when started with `ready byte`, else by closing fd 5. SIGTERM (sent by the
# shim when the process's stdio is closed) is ignored until the record is written.
RECORDER = """#!/usr/bin/python3
import json, os, select, signal, sys

signal.signal(signal.SIGTERM, signal.SIG_IGN)
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
if args.get("ready") == "byte":
    os.write(5, b"R")
os.close(5)
with open("/proc/self/environ", "rb") as f:
    env = dict(e.split("=", 1) for e in f.read().decode().split("\\0") if e)
got = {3: b"", 4: b""}
poller = select.poll()
for fd in got:
    poller.register(fd, select.POLLIN)
open_fds = set(got)
while open_fds:
    for fd, _ in poller.poll():
        chunk = os.read(fd, 65536)
        if chunk:
            got[fd] += chunk
        else:
            poller.unregister(fd)
            open_fds.discard(fd)
record = {
    "args": args,
    "env": env,
    "std_fds": [os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)],
    "fd3": got[3].decode(),
    "fd4": got[4].decode(),
}
with open(args["out"] + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(args["out"] + ".tmp", args["out"])
"""


def write_script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@contextlib.contextmanager
def ctr_background(
    containerd: PrivateContainerd, *args: str, stdin: int = subprocess.DEVNULL
) -> Iterator[subprocess.Popen[bytes]]:
    """ctr with piped stdout, killed on the way out if it still runs."""
    ctr = containerd.start_ctr(*args, stdin=stdin, stdout=subprocess.PIPE)
    try:
        yield ctr
    finally:
        ctr.kill()
        ctr.wait(timeout=10)
        for stream in (ctr.stdin, ctr.stdout, ctr.stderr):
            if stream is not None:
                stream.close()


# -- binary:// and binary-v2:// -------------------------------------------------------------


def test_binary_logger_gets_init_stdout_and_stderr(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    logger = write_script(tmp_path / "recorder", RECORDER)
    record = tmp_path / "record.json"
    command = "echo to-stdout; echo to-stderr >&2"
    containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--log-uri", f"binary://{logger}?out={record}",
        containerd.image, "io-binlog", "sh", "-c", command,
    )  # fmt: skip

    assert wait_until(record.exists, timeout=10)
    got = json.loads(record.read_text())
    assert got["args"] == {"out": str(record)}
    assert got["env"] == {"CONTAINER_ID": "io-binlog", "CONTAINER_NAMESPACE": containerd.namespace}
    assert got["std_fds"] == ["/dev/null"] * 3
    assert (got["fd3"], got["fd4"]) == ("to-stdout\n", "to-stderr\n")


def test_binary_v2_logger_gets_exec_output(containerd: PrivateContainerd, tmp_path: Path) -> None:
    logger = write_script(tmp_path / "recorder", RECORDER)
    record = tmp_path / "record.json"
    containerd.run_detached("io-binv2", "sleep", "1000")
    uri = f"binary-v2://{logger}?out={record}&ready=byte"
    containerd.ctr(
        "tasks", "exec", "--exec-id", "logged", "--log-uri", uri, "io-binv2",
        "sh", "-c", "echo exec-out; echo exec-err >&2",
    )  # fmt: skip

    assert wait_until(record.exists, timeout=10)
    got = json.loads(record.read_text())
    assert got["args"] == {"out": str(record), "ready": "byte"}
    assert got["env"] == {"CONTAINER_ID": "logged", "CONTAINER_NAMESPACE": containerd.namespace}
    assert (got["fd3"], got["fd4"]) == ("exec-out\n", "exec-err\n")
    containerd.kill_and_delete("io-binv2")


@pytest.mark.parametrize(
    ("scheme", "script", "error"),
    [
        ("binary", "#!/bin/sh\nexit 3\n", "exited with status 3 before it was ready"),
        (
            "binary-v2",
            "#!/bin/sh\nexec 5>&-\nexec sleep 1000\n",
            "closed its ready fd 5 without writing the ready byte",
        ),
    ],
    ids=["dies", "v2-closes-without-byte"],
)
def test_failing_logger_fails_create_clearly(
    containerd: PrivateContainerd, tmp_path: Path, scheme: str, script: str, error: str
) -> None:
    logger = write_script(tmp_path / "logger", script)
    failed = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--log-uri", f"{scheme}://{logger}",
        containerd.image, "io-badlog", "echo", "never",
        check=False,
    )  # fmt: skip
    containerd.ctr("containers", "delete", "io-badlog", check=False)

    assert failed.returncode != 0
    assert error in failed.stderr, failed.stderr
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, containerd.image, "io-afterbad", "echo", "fine"
    )
    assert result.stdout == "fine\n"


def test_silent_logger_fails_exec_and_the_shim_keeps_serving(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    pid_file = tmp_path / "logger.pid"
    logger = write_script(
        tmp_path / "silent", f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 1000\n"
    )
    containerd.run_detached("io-silent", "sleep", "1000")
    (shim,) = containerd.shim_pids()

    failed = containerd.ctr(
        "tasks", "exec", "--exec-id", "quiet", "--log-uri", f"binary://{logger}",
        "io-silent", "true",
        check=False,
    )  # fmt: skip

    assert failed.returncode != 0
    assert "did not signal ready within" in failed.stderr, failed.stderr
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists(), "logger left running"
    after = containerd.ctr("tasks", "exec", "--exec-id", "after", "io-silent", "echo", "served")
    assert after.stdout == "served\n"
    assert containerd.shim_pids() == [shim]
    containerd.kill_and_delete("io-silent")


# -- file:// --------------------------------------------------------------------------------


def test_file_uri_appends_both_streams_in_order(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    log_file = tmp_path / "logs" / "c.log"
    log_file.parent.mkdir()
    log_file.write_text("earlier\n")
    lines = 3000
    command = f"i=0; while [ $i -lt {lines} ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--log-uri", f"file://{log_file}",
        containerd.image, "io-filelog", "sh", "-c", command,
    )  # fmt: skip

    written = log_file.read_text().splitlines()
    assert written[0] == "earlier"
    torn = [line for line in written[1:] if not re.fullmatch(r"(out|err)\d+", line)]
    assert not torn
    for stream in ("out", "err"):
        numbers = [int(line[3:]) for line in written[1:] if line.startswith(stream)]
        assert numbers == list(range(lines)), f"{stream} lines lost or reordered"


# -- terminals and CloseIO ------------------------------------------------------------------


def read_until(fd: int, output: bytearray, text: bytes, timeout: float) -> bool:
    """Reads `fd` (a pty master or a FIFO) into `output` until it holds `text`, EOF or timeout."""
    deadline = time.monotonic() + timeout
    while text not in output and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed its side
                return text in output
            if not chunk:
                break
            output += chunk
    return text in output


def reap_within(pid: int, timeout: float) -> int | None:
    """The exit code of child `pid` once it exits, None if it still runs after `timeout`."""
    codes: list[int] = []

    def reaped() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
        return bool(codes)

    return codes[0] if wait_until(reaped, timeout=timeout) else None


def test_tty_exec_sees_resize(containerd: PrivateContainerd) -> None:
    containerd.run_detached("io-ttyexec", "sleep", "1000")
    script = (
        'until [ "$(stty size)" = "37 113" ]; do sleep 0.05; done; echo first $(stty size); '
        'until [ "$(stty size)" = "50 150" ]; do sleep 0.05; done; echo second $(stty size)'
    )
    pid, master = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 113, 0, 0))
        argv = containerd.ctr_command(
            "tasks", "exec", "-t", "--exec-id", "sized", "io-ttyexec", "sh", "-c", script
        )
        os.execve(argv[0], argv, containerd.ctr_env)
    output = bytearray()
    status = None
    try:
        assert read_until(master, output, b"first 37 113", timeout=30), output
        # ctr gets SIGWINCH and sends ResizePty for the exec process.
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 150, 0, 0))
        assert read_until(master, output, b"second 50 150", timeout=30), output
        status = reap_within(pid, timeout=30)
    finally:
        if status is None:
            containerd.ctr("tasks", "kill", "--exec-id", "sized", "io-ttyexec", check=False)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)
    assert status == 0
    containerd.kill_and_delete("io-ttyexec")


def test_close_io_gives_cat_eof_without_terminal(containerd: PrivateContainerd) -> None:
    containerd.run_detached("io-cionotty", "sleep", "1000")
    command = (
        "tasks",
        "exec",
        "--exec-id",
        "cat",
        "io-cionotty",
        "sh",
        "-c",
        "echo ready; cat; echo done",
    )
    with ctr_background(containerd, *command, stdin=subprocess.PIPE) as ctr:
        assert ctr.stdin is not None and ctr.stdout is not None
        assert ctr.stdout.readline() == b"ready\n"
        ctr.stdin.write(b"hello\n")
        ctr.stdin.close()  # ctr's stdin ends: it sends CloseIO
        out = ctr.stdout.read()
        assert ctr.wait(timeout=30) == 0
    assert out == b"hello\ndone\n"
    containerd.kill_and_delete("io-cionotty")


class ShimExec:
    """One exec process driven straight through the shim of a running container, with FIFOs
    made by the test, the way containerd drives it: for what ctr cannot do (CloseIO under a
    terminal) or cannot be trusted with (ctr 2.x, also with the Go shim, sometimes drops the
    tail of a large output that it reads more slowly than the container writes)."""

    def __init__(self, client: Client, container_id: str, exec_id: str) -> None:
        self._client = client
        self.ids = {"id": container_id, "exec_id": exec_id}

    @classmethod
    @contextlib.asynccontextmanager
    async def started(
        cls,
        containerd: PrivateContainerd,
        container_id: str,
        exec_id: str,
        args: list[str],
        *,
        stdout: Path,
        stdin: Path | None = None,
        terminal: bool = False,
    ) -> AsyncIterator[ShimExec]:
        """Exec and Start of `args` with these FIFOs; Wait and Delete are left to the caller."""
        bundle = containerd.bundle(container_id)
        address = (bundle / "address").read_text().removeprefix("unix://")
        spec = json.loads((bundle / "config.json").read_text())["process"]
        spec.update(terminal=terminal, args=args)
        spec_any = AnyProto(type_url=PROCESS_SPEC_TYPE, value=json.dumps(spec).encode())
        async with await Client.connect(address) as client:
            process = cls(client, container_id, exec_id)
            request = api.ExecProcessRequest(
                **process.ids, terminal=terminal, stdin=str(stdin or ""), stdout=str(stdout),
                spec=spec_any,
            )  # fmt: skip
            await process.call("Exec", request, Empty)
            await process.call("Start", api.StartRequest(**process.ids), api.StartResponse)
            yield process

    async def call(self, method: str, request: Message, response: type[Message]) -> Any:
        return await self._client.call(TASK, method, request, response, timeout=30)

    async def wait_and_delete(self) -> int:
        """The exit status, once the process exited; then it is deleted."""
        waited = await self.call("Wait", api.WaitRequest(**self.ids), api.WaitResponse)
        await self.call("Delete", api.DeleteRequest(**self.ids), api.DeleteResponse)
        return int(waited.exit_status)


def test_close_io_gives_cat_eof_with_terminal(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    # `ctr exec -t` keeps its stdin writer open and never sends CloseIO.
    containerd.run_detached("io-ciotty", "sleep", "1000")
    stdin_path, stdout_path = tmp_path / "stdin", tmp_path / "stdout"
    for fifo in (stdin_path, stdout_path):
        os.mkfifo(fifo, 0o600)
    stdout = os.open(stdout_path, os.O_RDONLY | os.O_NONBLOCK)
    # The shim types the terminal's EOF character: cat exits 0 and later output still flows.
    args = ["sh", "-c", "cat; echo cat-done"]

    async def exec_cat() -> tuple[int, bytes]:
        async with ShimExec.started(
            containerd,
            "io-ciotty",
            "ttycat",
            args,
            stdout=stdout_path,
            stdin=stdin_path,
            terminal=True,
        ) as cat:
            writer = os.open(stdin_path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, b"hello\n")
            os.close(writer)
            # Echoed by the terminal, then printed by cat.
            output = bytearray()
            await asyncio.to_thread(read_until, stdout, output, b"hello\r\nhello", 30)
            assert output.count(b"hello") == 2, output
            await cat.call("CloseIO", api.CloseIORequest(**cat.ids, stdin=True), Empty)
            await asyncio.to_thread(read_until, stdout, output, b"cat-done", 30)
            return await cat.wait_and_delete(), bytes(output)

    try:
        status, output = asyncio.run(asyncio.wait_for(exec_cat(), timeout=60))
    finally:
        os.close(stdout)
    assert status == 0
    assert output.endswith(b"cat-done\r\n"), output
    containerd.kill_and_delete("io-ciotty")


# -- bulk output and readers that go away -------------------------------------------------


def test_two_hundred_megabytes_of_stdout_arrive_byte_exact(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    chunk = os.urandom(8 << 20)
    (tmp_path / "chunk").write_bytes(chunk)
    repeats = 25  # 200 MiB
    expected = hashlib.sha256()
    for _ in range(repeats):
        expected.update(chunk)
    mount = f"type=bind,src={tmp_path},dst=/data,options=rbind:ro"
    containerd.ctr(
        "run", "-d", "--runtime", RUNTIME, "--mount", mount, containerd.image, "io-big",
        "sleep", "1000",
    )  # fmt: skip
    stdout_path = tmp_path / "stdout"
    os.mkfifo(stdout_path, 0o600)
    stdout = os.open(stdout_path, os.O_RDONLY | os.O_NONBLOCK)
    script = f"i=0; while [ $i -lt {repeats} ]; do cat /data/chunk; i=$((i+1)); done"

    def read_all() -> tuple[int, str]:
        os.set_blocking(stdout, True)
        got = hashlib.sha256()
        size = 0
        while block := os.read(stdout, 1 << 20):
            got.update(block)
            size += len(block)
        return size, got.hexdigest()

    async def exec_writer() -> tuple[int, int, str]:
        args = ["sh", "-c", script]
        async with ShimExec.started(containerd, "io-big", "cat", args, stdout=stdout_path) as w:
            # The shim holds its writer from Start on, so EOF means all output was copied.
            size, digest = await asyncio.to_thread(read_all)
            return await w.wait_and_delete(), size, digest

    try:
        status, size, digest = asyncio.run(asyncio.wait_for(exec_writer(), timeout=90))
    finally:
        os.close(stdout)
    assert status == 0
    assert size == repeats * len(chunk)
    assert digest == expected.hexdigest()
    containerd.kill_and_delete("io-big")


def test_stdout_reader_killed_mid_stream(containerd: PrivateContainerd, tmp_path: Path) -> None:
    # Its own FIFO dir: a killed ctr cannot remove its FIFOs, and the harness checks its own.
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    containerd.run_detached("io-bystander", "sleep", "1000")
    args = ("run", "--runtime", RUNTIME, "--fifo-dir", str(fifo_dir), containerd.image, "io-chatty")
    with ctr_background(containerd, *args, "yes", "0123456789abcdef") as ctr:
        assert ctr.stdout is not None
        received = 0
        while received < 8 << 20:
            received += len(os.read(ctr.stdout.fileno(), 1 << 20))
        shims = set(containerd.shim_pids())
        ctr.kill()  # the FIFO's reader dies mid-stream
        ctr.wait(timeout=10)

    # The container now blocks on a full pipe: neither it nor its shim gets EPIPE.
    time.sleep(1)
    assert containerd.task_status("io-chatty") == "RUNNING"
    assert containerd.task_status("io-bystander") == "RUNNING"
    assert set(containerd.shim_pids()) == shims
    served = containerd.ctr("tasks", "exec", "--exec-id", "alive", "io-chatty", "echo", "alive")
    assert served.stdout == "alive\n"
    other = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, containerd.image, "io-other", "echo", "unaffected"
    )
    assert other.stdout == "unaffected\n"
    containerd.kill_and_delete("io-chatty")
    assert containerd.task_status("io-chatty") == "absent"
    containerd.kill_and_delete("io-bystander")
