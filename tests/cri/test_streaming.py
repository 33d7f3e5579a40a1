"""`kubectl exec -it` and `kubectl attach` through containerd's CRI streaming server: the URL
from CRI Exec / Attach upgraded to a WebSocket (tests/cri/streaming.py). Every test runs on
our shims and on `runc`, containerd's own shim, with the same assertions.

What reaches the shim (PROTOCOL S): a streaming Exec is Exec, Start, Wait, ResizePty for each
resize message, CloseIO when the client's stdin ends (non-tty only), Delete; an Attach writes
to the container's existing FIFOs and sends ResizePty for the init process.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from cri_api.v1 import api_pb2 as cri_pb
from cri_client import CriClient
from harness import PrivateContainerd, wait_until
from runsc_support import require_runsc
from streaming import STDERR, STDOUT, Stream

HANDLERS = ["pyrunc", "pyrunsc", "runc"]
STTY_SIZE = b"stty size\n"  # typed until the terminal shows the size sent last


@pytest.fixture(params=HANDLERS)
def handler(request: pytest.FixtureRequest) -> str:
    if request.param == "pyrunsc":
        require_runsc()
    return str(request.param)


def run_container(
    cri: CriClient, image: str, handler: str, command: Sequence[str], **options: bool
) -> str:
    return cri.run_container(cri.run_pod(handler), image, command, **options)


def exec_stream(cri: CriClient, container_id: str, command: Sequence[str], tty: bool) -> Stream:
    # CRI refuses stderr with a tty: the terminal's output is all on stdout.
    request = cri_pb.ExecRequest(
        container_id=container_id,
        cmd=list(command),
        tty=tty,
        stdin=True,
        stdout=True,
        stderr=not tty,
    )
    return Stream(cri.call("Exec", request).url)


def test_exec_without_tty_separates_stdout_and_stderr_and_reports_the_exit_code(
    containerd: PrivateContainerd, cri: CriClient, handler: str
) -> None:
    container = run_container(cri, containerd.image, handler, ["sleep", "3600"])
    script = "head -n 1; echo to stderr >&2; exit 3"
    with exec_stream(cri, container, ["sh", "-c", script], tty=False) as stream:
        stream.write(b"from stdin\n")
        assert stream.wait() == 3
        assert stream.output(STDOUT) == b"from stdin\n"
        assert stream.output(STDERR) == b"to stderr\n"


def test_exec_without_tty_gets_stdin_eof_when_the_client_detaches(
    containerd: PrivateContainerd, cri: CriClient, handler: str
) -> None:
    """v4 cannot half-close stdin: the end of the connection is the end of stdin, which CRI
    passes on as CloseIO; `cat` echoes what it got, then exits on the EOF."""
    container = run_container(cri, containerd.image, handler, ["sleep", "3600"])
    script = "cat; touch /tmp/stdin-ended"
    with exec_stream(cri, container, ["sh", "-c", script], tty=False) as stream:
        stream.write(b"ping\n")
        stream.wait_for(b"ping\n")
    assert wait_until(
        lambda: cri.exec_sync(container, ["test", "-e", "/tmp/stdin-ended"]).exit_code == 0,
        timeout=60,
        interval=0.2,
    ), "cat never saw the end of its stdin"


def test_exec_with_tty_is_resized_and_answers_on_stdout(
    containerd: PrivateContainerd, cri: CriClient, handler: str
) -> None:
    container = run_container(cri, containerd.image, handler, ["sleep", "3600"])
    with exec_stream(cri, container, ["sh"], tty=True) as stream:
        stream.resize(width=123, height=37)
        stream.wait_for(b"37 123\r\n", retype=STTY_SIZE)
        stream.resize(width=90, height=21)
        stream.wait_for(b"21 90\r\n", retype=STTY_SIZE)
        stream.write(b"exit 4\n")
        assert stream.wait() == 4


def test_attach_to_a_tty_shell_types_commands_resizes_and_detaches(
    containerd: PrivateContainerd, cri: CriClient, handler: str
) -> None:
    container = run_container(cri, containerd.image, handler, ["sh"], tty=True, stdin=True)
    request = cri_pb.AttachRequest(container_id=container, stdin=True, tty=True, stdout=True)
    with Stream(cri.call("Attach", request).url) as stream:
        stream.resize(width=101, height=29)
        stream.wait_for(b"29 101\r\n", retype=STTY_SIZE)
    # Detached (no StdinOnce): the shell runs on; a second attach reaches the same shell.
    assert cri.state(container) == cri_pb.ContainerState.CONTAINER_RUNNING
    with Stream(cri.call("Attach", request).url) as stream:
        stream.write(b"echo $((6 * 7)); exit 7\n")
        stream.wait_for(b"42\r\n")
        assert stream.wait() == 0  # the attach itself succeeded
    assert cri.wait_exited(container).exit_code == 7


def test_wasm_exec_streams_stdout_stderr_and_the_exit_code(
    containerd: PrivateContainerd, cri: CriClient, wasm_image: str
) -> None:
    """A module has no terminal: only a plain streaming exec."""
    container = run_container(cri, wasm_image, "pywasm", ["/loop.wasm"])
    request = cri_pb.ExecRequest(
        container_id=container, cmd=["/say.wasm", "out", "err", "3"], stdout=True, stderr=True
    )
    with Stream(cri.call("Exec", request).url) as stream:
        assert stream.wait() == 3
        assert (stream.output(STDOUT), stream.output(STDERR)) == (b"out\n", b"err\n")
