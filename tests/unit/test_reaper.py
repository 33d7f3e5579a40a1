"""The one reaper: every exit routed with the right status, orphans reaped, no zombies."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from shim.sys._native import lib
from shim.sys.reaper import Exit, Reaper
from shim.sys.spawn import run_command, spawn

T = TypeVar("T")


def with_reaper(body: Callable[[Reaper], Awaitable[T]], timeout: float = 20) -> T:
    """Runs `body` on a fresh loop with a reaper installed, and uninstalls it after."""

    async def main() -> T:
        reaper = Reaper.install(asyncio.get_running_loop())
        try:
            async with asyncio.timeout(timeout):
                return await body(reaper)
        finally:
            reaper.close()

    return asyncio.run(main())


def zombie_children() -> list[int]:
    """Pids of zombies whose parent is this process."""
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        # Fields after the parenthesised command name: state, ppid, ...
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(ppid) == os.getpid():
            zombies.append(int(entry))
    return zombies


def orphan_script(status: int) -> list[str]:
    """A command whose child (a subshell) outlives it, so is re-parented to us, then exits
    with `status`; the command prints the child's pid."""
    # The child waits for its parent ($$ in a subshell) to be reaped; had it exited first,
    # the parent shell could have reaped it itself.
    child = f"while kill -0 $$ 2>/dev/null; do sleep 0.01; done; exit {status}"
    return ["sh", "-c", f"( {child} ) >/dev/null & echo $!"]


async def until_gone(pid: int) -> None:
    """Waits until `pid` was reaped (its /proc entry disappears)."""
    while os.path.exists(f"/proc/{pid}"):
        await asyncio.sleep(0.01)


def test_200_concurrent_children_each_get_their_own_exit_status() -> None:
    async def body(reaper: Reaper) -> list[Exit]:
        started = [spawn(reaper, ["sh", "-c", f"exit {i % 256}"]) for i in range(200)]
        exits = await asyncio.gather(*(future for _, future in started))
        assert [e.pid for e in exits] == [pid for pid, _ in started]
        return exits

    exits = with_reaper(body)
    assert [e.status for e in exits] == [i % 256 for i in range(200)]
    assert all(e.exited_at_ns > 0 for e in exits)
    assert zombie_children() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_killed_child_reports_128_plus_signal(sig: signal.Signals) -> None:
    async def body(reaper: Reaper) -> Exit:
        pid, exited = spawn(reaper, ["sleep", "30"])
        os.kill(pid, sig)
        return await exited

    assert with_reaper(body).status == 128 + sig


def test_orphan_that_exits_before_its_pid_is_known_is_seen_in_collect_window() -> None:
    async def body(reaper: Reaper) -> tuple[asyncio.Future[Exit], int]:
        with reaper.collect():
            # The grandchild is orphaned as its parent exits and re-parented to us.
            result = await run_command(reaper, orphan_script(7))
            orphan = int(result.stdout)
            await until_gone(orphan)
            return reaper.watch(orphan), orphan

    exited, orphan = with_reaper(body)
    assert exited.done()
    assert exited.result().pid == orphan
    assert exited.result().status == 7


def test_orphan_watched_before_it_exits_is_reaped_by_us() -> None:
    async def body(reaper: Reaper) -> Exit:
        result = await run_command(reaper, ["sh", "-c", "sleep 30 >/dev/null & echo $!"])
        orphan = int(result.stdout)
        with open(f"/proc/{orphan}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
        exited = reaper.watch(orphan)
        os.kill(orphan, signal.SIGTERM)
        return await exited

    assert with_reaper(body).status == 128 + signal.SIGTERM
    assert zombie_children() == []


def test_unwatched_exit_outside_any_window_is_reaped_and_dropped() -> None:
    async def body(reaper: Reaper) -> bool:
        result = await run_command(reaper, orphan_script(3))
        orphan = int(result.stdout)
        await until_gone(orphan)
        return reaper.watch(orphan).done()

    assert with_reaper(body) is False
    assert zombie_children() == []


def test_exit_stays_available_while_any_overlapping_window_is_open() -> None:
    async def body(reaper: Reaper) -> tuple[bool, bool]:
        with reaper.collect():
            with reaper.collect():
                result = await run_command(reaper, orphan_script(4))
                orphan = int(result.stdout)
                await until_gone(orphan)
            inner_closed = reaper.watch(orphan)
        # Taken once: a second watch of the same pid (a reused pid) must not get it again.
        return inner_closed.done() and inner_closed.result().status == 4, reaper.watch(
            orphan
        ).done()

    assert with_reaper(body) == (True, False)


def test_close_restores_sigchld_disposition_and_subreaper_flag() -> None:
    assert lib.pyshim_is_child_subreaper() == 0

    async def body(reaper: Reaper) -> int:
        return lib.pyshim_is_child_subreaper()

    assert with_reaper(body) == 1
    assert lib.pyshim_is_child_subreaper() == 0
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL


def test_close_cancels_pending_watches() -> None:
    async def main() -> asyncio.Future[Exit]:
        reaper = Reaper.install(asyncio.get_running_loop())
        pid, exited = spawn(reaper, ["sleep", "30"])
        reaper.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return exited

    assert asyncio.run(main()).cancelled()
