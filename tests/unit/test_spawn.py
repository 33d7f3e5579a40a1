"""Helper commands and long-lived children started through the reaper."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest
from test_reaper import until_gone, with_reaper, zombie_children

from shim.sys.reaper import Exit, Reaper
from shim.sys.spawn import CommandResult, fork_call, run_command, spawn


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_run_command_captures_status_stdout_and_stderr() -> None:
    before = open_fds()

    async def body(reaper: Reaper) -> CommandResult:
        return await run_command(reaper, ["sh", "-c", "echo out; echo err >&2; exit 3"])

    assert with_reaper(body) == CommandResult(3, b"out\n", b"err\n")
    assert open_fds() == before
    assert zombie_children() == []


def test_run_command_feeds_input_and_reads_output_larger_than_a_pipe_buffer() -> None:
    data = os.urandom(1 << 20)

    async def body(reaper: Reaper) -> CommandResult:
        return await run_command(reaper, ["cat"], input=data)

    result = with_reaper(body)
    assert result.status == 0
    assert result.stdout == data


def test_run_command_without_input_gives_dev_null_as_stdin() -> None:
    async def body(reaper: Reaper) -> CommandResult:
        return await run_command(reaper, ["cat"], timeout=5)

    assert with_reaper(body) == CommandResult(0, b"", b"")


def test_run_command_timeout_kills_and_reaps_the_child() -> None:
    before = open_fds()

    async def body(reaper: Reaper) -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await run_command(reaper, ["sleep", "30"], timeout=0.2)
        return time.monotonic() - started

    assert with_reaper(body) < 5
    assert open_fds() == before
    assert zombie_children() == []


def test_run_command_cancelled_kills_the_child() -> None:
    read_end, write_end = os.pipe()

    async def body(reaper: Reaper) -> None:
        command = run_command(reaper, ["sh", "-c", "echo $$; exec sleep 30"], fds={1: write_end})
        task = asyncio.create_task(command)
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        os.close(write_end)
        await until_gone(int(read_all(read_end)))

    try:
        with_reaper(body, timeout=5)
    finally:
        os.close(read_end)
    assert zombie_children() == []


def test_run_command_names_a_missing_binary() -> None:
    before = open_fds()

    async def body(reaper: Reaper) -> None:
        await run_command(reaper, ["/nonexistent/runc-xyz", "state"])

    with pytest.raises(FileNotFoundError, match="runc-xyz"):
        with_reaper(body)
    assert open_fds() == before


def test_run_command_drops_notify_socket_from_the_default_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("PYSHIM_TEST_VAR", "kept")

    async def body(reaper: Reaper) -> CommandResult:
        script = 'echo "${NOTIFY_SOCKET-unset} $PYSHIM_TEST_VAR"'
        return await run_command(reaper, ["sh", "-c", script])

    assert with_reaper(body).stdout == b"unset kept\n"


def test_run_command_sends_output_to_given_fds_instead_of_capturing() -> None:
    read_end, write_end = os.pipe()

    async def body(reaper: Reaper) -> CommandResult:
        return await run_command(reaper, ["sh", "-c", "echo to-pipe"], fds={1: write_end})

    try:
        result = with_reaper(body)
        os.close(write_end)
        assert result == CommandResult(0, b"", b"")
        assert read_all(read_end) == b"to-pipe\n"
    finally:
        os.close(read_end)


def test_spawn_passes_exactly_the_mapped_fds_even_when_numbers_collide() -> None:
    pipes = [os.pipe() for _ in range(3)]
    # Put the write ends at 40, 41, 42 and ask for a swap (40 <-> 41) plus a same-number 42.
    for number, (_, write_end) in zip((40, 41, 42), pipes, strict=True):
        os.dup2(write_end, number, inheritable=False)
        os.close(write_end)
    script = (
        "import os\n"
        "open_fds = [fd for fd in range(64) if os.path.exists(f'/proc/self/fd/{fd}')]\n"
        "os.write(40, b'a'); os.write(41, b'b'); os.write(42, repr(open_fds).encode())\n"
    )

    async def body(reaper: Reaper) -> Exit:
        argv = [sys.executable, "-S", "-c", script]
        _, exited = spawn(reaper, argv, fds={40: 41, 41: 40, 42: 42})
        return await exited

    try:
        assert with_reaper(body).status == 0
    finally:
        for number in (40, 41, 42):
            os.close(number)
    outputs = [read_all(read_end) for read_end, _ in pipes]
    for read_end, _ in pipes:
        os.close(read_end)
    # Pipe 0 was our fd 40, which the child got as 41 (and the other way round).
    assert outputs[0] == b"b"
    assert outputs[1] == b"a"
    assert outputs[2] == b"[0, 1, 2, 40, 41, 42]"


def test_spawn_gives_dev_null_for_unmapped_stdio() -> None:
    read_end, write_end = os.pipe()

    async def body(reaper: Reaper) -> Exit:
        script = "readlink /proc/self/fd/0 >&3; readlink /proc/self/fd/2 >&3"
        _, exited = spawn(reaper, ["sh", "-c", script], fds={3: write_end})
        return await exited

    try:
        assert with_reaper(body).status == 0
        os.close(write_end)
        assert read_all(read_end) == b"/dev/null\n/dev/null\n"
    finally:
        os.close(read_end)


def test_fork_call_gives_the_child_only_its_fds_and_default_signal_actions() -> None:
    """The wasm runner's start: a fork running our function, with the fds it was given (even
    when a source is another one's target), none of ours, and no event-loop handler."""
    before = open_fds()
    report_read, report_write = os.pipe()
    stray_read, stray_write = os.pipe()  # ours only: must be closed in the child

    def child() -> int:
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        handler = signal.getsignal(signal.SIGTERM)
        os.write(1, f"{fds} {handler == signal.SIG_DFL}".encode())
        return 7

    async def body(reaper: Reaper) -> Exit:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)
        # Target 1 gets fd 3's pipe while target 3 gets the write end: sources cross targets.
        _pid, exited = fork_call(reaper, child, fds={1: report_write, 3: stray_write})
        return await asyncio.wait_for(exited, 10)

    exit_status = with_reaper(body)
    os.close(report_write)
    os.close(stray_write)
    printed = read_all(report_read).decode()
    os.close(report_read)
    os.close(stray_read)
    assert exit_status.status == 7
    # 0-3 plus the fd listdir itself opens; no stray pipe end, no loop fd.
    fds, default = printed.rsplit(" ", 1)
    assert fds == "[0, 1, 2, 3, 4]"
    assert default == "True"
    assert open_fds() == before
