"""binary:// stdio: logging binaries written by the test, started through a ProcessIO."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from test_io_support import open_fds, run, start_container

from shim.io import logger
from shim.io.logger import LoggerStartError, LoggerTimeoutError
from shim.io.stdio import ProcessIO
from shim.sys.reaper import Reaper

pytestmark = pytest.mark.timeout(60)

# Records what it was given, signals ready, then copies fds 3 and 4 into files. It ignores
# the SIGTERM of ProcessIO.close() (which may come before its copies reach EOF), as a logger
# that flushes before it exits would.
RECORDING_LOGGER = """#!/bin/sh
trap '' TERM
dir=$(dirname "$0")
printf '%s\\n' "$@" > "$dir/args"
tr '\\0' '\\n' < /proc/$$/environ > "$dir/env"
fds=$(for fd in 0 1 2 3 4 5; do echo "$fd $(readlink /proc/$$/fd/$fd)"; done)
echo "$fds" > "$dir/fds"
cat <&3 > "$dir/stdout" 5>&- &
cat <&4 > "$dir/stderr" 5>&- &
READY
exec 5>&-
wait
"""


def write_logger(directory: Path, body: str) -> Path:
    path = directory / "logger"
    path.write_text(body)
    path.chmod(0o755)
    return path


async def binary_io(reaper: Reaper, uri: str, stderr: str | None = None) -> ProcessIO:
    return await ProcessIO.create(
        reaper=reaper,
        process_id="exec-7",
        namespace="k8s.io",
        stdin="",
        stdout=uri,
        stderr=uri if stderr is None else stderr,
        terminal=False,
    )


@pytest.mark.parametrize(
    ("scheme", "ready"),
    [("binary", ":"), ("binary-v2", "printf x >&5")],
    ids=["binary-ready-by-close", "binary-v2-ready-byte"],
)
def test_logging_binary_gets_fds_args_env_and_both_streams(
    tmp_path: Path, scheme: str, ready: str, caplog: pytest.LogCaptureFixture
) -> None:
    exe = write_logger(tmp_path, RECORDING_LOGGER.replace("READY", ready))
    before = open_fds()

    async def body(reaper: Reaper) -> int:
        io = await binary_io(reaper, f"{scheme}://{exe}?--level=debug&tag=x")
        assert None not in io.runtime_stdio[1:]
        exited = start_container(reaper, io, ["sh", "-c", "echo to-out; echo to-err >&2"])
        status = (await exited).status
        await io.wait_output(5)
        # The logger ends by itself at EOF of both pipes; close() finds it gone.
        started = time.monotonic()
        await io.close()
        assert time.monotonic() - started < 5
        return status

    with caplog.at_level(logging.WARNING):
        assert run(body) == 0
    assert not caplog.records  # a logger ending after its input ended is no news
    assert (tmp_path / "args").read_text() == "--level\ndebug\ntag\nx\n"
    env = sorted((tmp_path / "env").read_text().split())
    assert env == ["CONTAINER_ID=exec-7", "CONTAINER_NAMESPACE=k8s.io"]
    fds = dict(line.split(" ", 1) for line in (tmp_path / "fds").read_text().splitlines())
    assert [fds[n] for n in "012"] == ["/dev/null"] * 3
    assert all(fds[n].startswith("pipe:") for n in "345")
    assert (tmp_path / "stdout").read_text() == "to-out\n"
    assert (tmp_path / "stderr").read_text() == "to-err\n"
    assert open_fds() == before


def test_logger_that_exits_without_ready_fails_create_clearly(tmp_path: Path) -> None:
    exe = write_logger(tmp_path, "#!/bin/sh\nexit 3\n")
    before = open_fds()

    async def body(reaper: Reaper) -> None:
        await binary_io(reaper, f"binary://{exe}")

    with pytest.raises(LoggerStartError, match=r"exited with status 3 before it was ready"):
        run(body)
    assert open_fds() == before


def test_v2_logger_that_closes_fd_5_without_the_byte_fails(tmp_path: Path) -> None:
    exe = write_logger(tmp_path, "#!/bin/sh\nexec 5>&-\nsleep 30\n")

    async def body(reaper: Reaper) -> None:
        await binary_io(reaper, f"binary-v2://{exe}")

    with pytest.raises(LoggerStartError, match="without writing the ready byte"):
        run(body)


def test_logger_that_never_signals_times_out_and_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logger, "READY_TIMEOUT", 0.3)
    exe = write_logger(tmp_path, "#!/bin/sh\nexec sleep 30\n")

    async def body(reaper: Reaper) -> None:
        await binary_io(reaper, f"binary://{exe}")

    started = time.monotonic()
    with pytest.raises(LoggerTimeoutError, match=r"did not signal ready within 0.3 s"):
        run(body)
    # It was killed and reaped, not waited for.
    assert time.monotonic() - started < 5


def test_missing_logging_binary_fails_create(tmp_path: Path) -> None:
    async def body(reaper: Reaper) -> None:
        await binary_io(reaper, f"binary://{tmp_path}/nothing-here")

    with pytest.raises(LoggerStartError, match="nothing-here"):
        run(body)


def test_stdout_and_stderr_must_name_the_same_binary(tmp_path: Path) -> None:
    async def body(reaper: Reaper) -> None:
        await binary_io(reaper, "binary:///a", stderr="binary:///b")

    with pytest.raises(ValueError, match="same logging binary"):
        run(body)


def test_container_survives_a_logger_that_dies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The shim keeps the pipes' read ends and drains them once the logger is gone, so the
    container neither gets SIGPIPE nor blocks on a full pipe."""
    exe = write_logger(tmp_path, "#!/bin/sh\nprintf x >&5\nexit 0\n")

    async def body(reaper: Reaper) -> int:
        io = await binary_io(reaper, f"binary://{exe}")
        await asyncio.sleep(0.2)  # the logger is gone
        exited = start_container(
            reaper, io, ["sh", "-c", "head -c 5000000 /dev/zero; head -c 5000000 /dev/zero >&2"]
        )
        status = (await exited).status
        await io.close()
        return status

    with caplog.at_level(logging.WARNING):
        assert run(body) == 0
    assert "discarding its output" in caplog.text


def test_close_kills_a_logger_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logger, "STOP_TIMEOUT", 0.3)
    exe = write_logger(
        tmp_path, "#!/bin/sh\ntrap '' TERM\nprintf x >&5\nwhile :; do sleep 1; done\n"
    )

    async def body(reaper: Reaper) -> float:
        io = await binary_io(reaper, f"binary://{exe}")
        io.close_runtime_ends()
        started = time.monotonic()
        await io.close()
        return time.monotonic() - started

    assert 0.25 < run(body) < 5
