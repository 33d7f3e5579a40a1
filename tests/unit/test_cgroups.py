"""Cgroup discovery, stats and OOM events: real v1 cgroups (root) and fake v2 trees."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim.api.cgroups.v1 import metrics_pb2 as v1
from shim.api.cgroups.v2 import metrics_pb2 as v2
from shim.sys.cgroups import Cgroup
from shim.sys.oom import OomWatcher

MAX_UINT64 = (1 << 64) - 1

HOST_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 /docker /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
"""


def is_cgroup_v1_host() -> bool:
    with open("/proc/self/cgroup") as f:
        return any(not line.startswith("0::") for line in f)


needs_v1_root = pytest.mark.skipif(
    os.geteuid() != 0 or not is_cgroup_v1_host(), reason="needs root on a cgroup v1 host"
)
needs_v2_root = pytest.mark.skipif(
    os.geteuid() != 0 or is_cgroup_v1_host(),
    reason="needs root on a cgroup v2 host (scripts/vm-test)",
)
# scripts/vm-test runs this module on a cgroup v2 guest; the v1 tests run on this host.
pytestmark = pytest.mark.cgroup


def test_v1_membership_resolves_comounted_controllers_and_mount_roots() -> None:
    membership = "4:cpu,cpuacct:/docker/abc\n3:memory:/abc\n1:name=systemd:/abc\n0::/abc\n"
    cgroup = Cgroup.from_proc(membership, HOST_MOUNTINFO)
    assert cgroup.version == 1  # hybrid (v1 controllers + unified mount) counts as v1
    assert cgroup.path("cpu") == "/sys/fs/cgroup/cpu,cpuacct/abc"
    assert cgroup.path("cpuacct") == "/sys/fs/cgroup/cpu,cpuacct/abc"
    assert cgroup.path("memory") == "/sys/fs/cgroup/memory/abc"
    with pytest.raises(FileNotFoundError):
        cgroup.path("pids")


def test_unified_only_membership_is_v2() -> None:
    cgroup = Cgroup.from_proc("0::/system.slice/x.scope\n", HOST_MOUNTINFO)
    assert cgroup.version == 2
    assert cgroup.path("memory") == "/sys/fs/cgroup/unified/system.slice/x.scope"


def test_for_pid_of_a_gone_process_raises_file_not_found() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(FileNotFoundError):
        Cgroup.for_pid(child.pid)


@pytest.fixture
def fake_v2(tmp_path: Path) -> Path:
    group = tmp_path / "pods" / "c1"
    (group / "inner").mkdir(parents=True)
    files = {
        "cgroup.procs": "10\n11\n",
        "inner/cgroup.procs": "12\n",
        "pids.current": "3\n",
        "pids.max": "max\n",
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"
        "nr_periods 7\nnr_throttled 2\nthrottled_usec 300\n",
        "memory.stat": "anon 4096\nfile 8192\nkernel_stack 16384\npgfault 99\n"
        "workingset_refault 5\nthp_collapse_alloc 1\nsome_future_key 42\n",
        "memory.current": "123456\n",
        "memory.max": "max\n",
        "memory.swap.current": "0\n",
        "memory.swap.max": "1048576\n",
        "memory.events": "low 0\nhigh 1\nmax 2\noom 3\noom_kill 4\n",
        "io.stat": "8:0 rbytes=100 wbytes=200 rios=3 wios=4 dbytes=0 dios=0\n",
        "hugetlb.2MB.current": "0\n",
        "hugetlb.2MB.max": "max\n",
        "hugetlb.2MB.rsvd.current": "0\n",
    }
    for name, text in files.items():
        (group / name).write_text(text)
    return group


def fake_v2_cgroup(group: Path) -> Cgroup:
    """The cgroup at `group` in a cgroup2 hierarchy mounted at its parent."""
    root = group.parent
    mountinfo = f"41 31 0:38 / {root} rw,relatime - cgroup2 cgroup2 rw\n"
    return Cgroup.from_proc(f"0::/{group.relative_to(root)}\n", mountinfo)


def test_v2_stats_are_read_from_a_cgroup_tree(fake_v2: Path) -> None:
    cgroup = fake_v2_cgroup(fake_v2)
    packed = cgroup.stats()
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    metrics = v2.Metrics.FromString(packed.value)
    assert (metrics.pids.current, metrics.pids.limit) == (3, MAX_UINT64)
    assert metrics.cpu == v2.CPUStat(
        usage_usec=1500,
        user_usec=1000,
        system_usec=500,
        nr_periods=7,
        nr_throttled=2,
        throttled_usec=300,
    )
    memory = metrics.memory
    assert (memory.anon, memory.file, memory.kernel_stack, memory.pgfault) == (
        4096,
        8192,
        16384,
        99,
    )
    assert (memory.workingset_refault, memory.thp_collapse_alloc) == (5, 1)
    assert (memory.usage, memory.usage_limit) == (123456, MAX_UINT64)
    assert (memory.swap_usage, memory.swap_limit) == (0, 1048576)
    assert metrics.memory_events == v2.MemoryEvents(low=0, high=1, max=2, oom=3, oom_kill=4)
    assert list(metrics.io.usage) == [
        v2.IOEntry(major=8, minor=0, rbytes=100, wbytes=200, rios=3, wios=4)
    ]
    assert list(metrics.hugetlb) == [v2.HugeTlbStat(pagesize="2MB", current=0, max=MAX_UINT64)]
    assert sorted(cgroup.pids()) == [10, 11, 12]


def test_v2_stats_of_a_sparse_cgroup_leave_missing_files_at_zero(tmp_path: Path) -> None:
    group = tmp_path / "pods" / "c2"
    group.mkdir(parents=True)
    (group / "cpu.stat").write_text("usage_usec 10\nuser_usec 6\nsystem_usec 4\n")
    metrics = v2.Metrics.FromString(fake_v2_cgroup(group).stats().value)
    assert metrics.cpu.usage_usec == 10
    assert metrics.memory.usage == 0
    assert not metrics.HasField("memory_events")


def test_v2_oom_kill_increase_is_reported_through_inotify(fake_v2: Path) -> None:
    events = fake_v2 / "memory.events"

    async def main() -> list[str]:
        reported: list[str] = []
        watcher = OomWatcher(asyncio.get_running_loop(), reported.append)
        try:
            watcher.add("c1", fake_v2_cgroup(fake_v2))
            # Counters other than oom_kill changing, or oom_kill unchanged, are no OOM kill.
            events.write_text("low 0\nhigh 5\nmax 2\noom 4\noom_kill 4\n")
            await asyncio.sleep(0.2)
            assert reported == []
            events.write_text("low 0\nhigh 5\nmax 2\noom 5\noom_kill 5\n")
            async with asyncio.timeout(5):
                while not reported:
                    await asyncio.sleep(0.01)
            watcher.remove("c1")
            events.write_text("low 0\nhigh 5\nmax 2\noom 6\noom_kill 6\n")
            await asyncio.sleep(0.2)
            return reported
        finally:
            watcher.close()

    assert asyncio.run(main()) == ["c1"]


class RealV1Cgroup:
    """A private v1 cgroup under ours in the memory, cpu, cpuacct and pids hierarchies."""

    CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")

    def __init__(self, name: str) -> None:
        ours = Cgroup.for_pid(os.getpid())
        self.dirs = [Path(ours.path(c)) / name for c in self.CONTROLLERS]
        for directory in self.dirs:
            directory.mkdir()

    def write(self, controller: str, name: str, value: str) -> None:
        (self.dirs[self.CONTROLLERS.index(controller)] / name).write_text(value)

    def enter(self, pid: int) -> None:
        for directory in self.dirs:
            (directory / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for directory in self.dirs:
            if directory.exists():
                directory.rmdir()


class RealV2Cgroup:
    """A private v2 cgroup under ours, with the controllers ours delegates."""

    def __init__(self, name: str) -> None:
        self.dir = Path(Cgroup.for_pid(os.getpid()).path("")) / name
        self.dir.mkdir()

    def write(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value)

    def enter(self, pid: int) -> None:
        self.write("cgroup.procs", str(pid))

    def remove(self) -> None:
        if self.dir.exists():
            self.dir.rmdir()


@pytest.fixture
def real_v2() -> Iterator[RealV2Cgroup]:
    cgroup = RealV2Cgroup(f"pyshim-test-{os.getpid()}")
    controllers = set((cgroup.dir / "cgroup.controllers").read_text().split())
    try:
        if not {"cpu", "memory", "pids"} <= controllers:
            pytest.skip(f"our cgroup delegates only {sorted(controllers)}")
        yield cgroup
    finally:
        cgroup.remove()


@pytest.fixture
def real_v1() -> Iterator[RealV1Cgroup]:
    cgroup = RealV1Cgroup(f"pyshim-test-{os.getpid()}")
    try:
        yield cgroup
    finally:
        cgroup.remove()


def gated_child(code: str) -> subprocess.Popen[bytes]:
    """A Python child that runs `code` once a line arrives on its stdin."""
    return subprocess.Popen(
        [sys.executable, "-S", "-c", f"import sys, time\nsys.stdin.readline()\n{code}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def stop(child: subprocess.Popen[bytes]) -> int:
    """Kills (if still running) and reaps the child, closing our pipes; its return code."""
    child.kill()
    child.communicate()
    return child.returncode


def open_gate(child: subprocess.Popen[bytes]) -> None:
    assert child.stdin is not None
    child.stdin.write(b"go\n")
    child.stdin.flush()


@needs_v1_root
@pytest.mark.timeout(60)
def test_v1_stats_of_a_real_cgroup(real_v1: RealV1Cgroup) -> None:
    real_v1.write("memory", "memory.limit_in_bytes", str(256 << 20))
    real_v1.write("pids", "pids.max", "50")
    # Memory is charged where it is allocated (v1 does not move charges): allocate after.
    child = gated_child(
        "data = b'x' * (8 << 20)\n"
        "while time.process_time() < 0.3: pass\n"
        "print('burnt', flush=True)\n"
        "time.sleep(30)"
    )
    try:
        real_v1.enter(child.pid)
        open_gate(child)
        cgroup = Cgroup.for_pid(child.pid)
        assert cgroup.version == 1
        assert cgroup.pids() == [child.pid]
        assert child.stdout is not None
        assert child.stdout.readline() == b"burnt\n"
        packed = cgroup.stats()
        assert packed.type_url == "io.containerd.cgroups.v1.Metrics"
        metrics = v1.Metrics.FromString(packed.value)
    finally:
        stop(child)
    assert (metrics.pids.current, metrics.pids.limit) == (1, 50)
    assert metrics.memory.usage.limit == 256 << 20
    assert 8 << 20 < metrics.memory.usage.usage < 256 << 20
    assert metrics.memory.usage.max >= metrics.memory.usage.usage
    assert metrics.memory.total_rss + metrics.memory.total_cache > 0
    assert metrics.cpu.usage.total >= 200_000_000  # ns: most of the 0.3 s of CPU burnt
    assert len(metrics.cpu.usage.per_cpu) >= 1
    assert metrics.cpu.usage.user + metrics.cpu.usage.kernel > 0
    assert metrics.memory_oom_control.oom_kill == 0


async def oom_reports(enter: Callable[[int], None], child: subprocess.Popen[bytes]) -> list[str]:
    """What OomWatcher reports once the gated child, moved into a cgroup by `enter`, runs."""
    reported: list[str] = []
    watcher = OomWatcher(asyncio.get_running_loop(), reported.append)
    try:
        enter(child.pid)
        watcher.add("hog", Cgroup.for_pid(child.pid))
        open_gate(child)
        async with asyncio.timeout(20):
            while not reported:
                await asyncio.sleep(0.01)
        return reported
    finally:
        watcher.close()


async def reports_after_removal(cgroup: Cgroup, remove: Callable[[], None]) -> list[str]:
    """What OomWatcher reports for a watched cgroup that `remove` deletes."""
    reported: list[str] = []
    watcher = OomWatcher(asyncio.get_running_loop(), reported.append)
    try:
        watcher.add("gone", cgroup)
        remove()
        await asyncio.sleep(0.3)
        return reported
    finally:
        watcher.close()


@needs_v1_root
@pytest.mark.timeout(60)
def test_v1_oom_kill_in_a_real_cgroup_is_reported(real_v1: RealV1Cgroup) -> None:
    real_v1.write("memory", "memory.limit_in_bytes", str(32 << 20))
    child = gated_child("hog = b'x' * (512 << 20)")

    try:
        assert asyncio.run(oom_reports(real_v1.enter, child)) == ["hog"]
        assert child.wait(timeout=10) == -signal.SIGKILL  # by the OOM killer
    finally:
        stop(child)


@needs_v1_root
@pytest.mark.timeout(60)
def test_v1_removed_cgroup_is_not_reported_as_oom(real_v1: RealV1Cgroup) -> None:
    child = gated_child("")
    real_v1.enter(child.pid)
    cgroup = Cgroup.for_pid(child.pid)
    open_gate(child)
    assert child.wait(timeout=10) == 0
    stop(child)

    assert asyncio.run(reports_after_removal(cgroup, real_v1.remove)) == []


@needs_v2_root
@pytest.mark.timeout(60)
def test_v2_stats_of_a_real_cgroup(real_v2: RealV2Cgroup) -> None:
    real_v2.write("memory.max", str(256 << 20))
    real_v2.write("pids.max", "50")
    child = gated_child(
        "data = b'x' * (8 << 20)\n"
        "while time.process_time() < 0.3: pass\n"
        "print('burnt', flush=True)\n"
        "time.sleep(30)"
    )
    try:
        real_v2.enter(child.pid)
        open_gate(child)
        cgroup = Cgroup.for_pid(child.pid)
        assert cgroup.version == 2
        assert cgroup.pids() == [child.pid]
        assert child.stdout is not None
        assert child.stdout.readline() == b"burnt\n"
        packed = cgroup.stats()
        assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
        metrics = v2.Metrics.FromString(packed.value)
    finally:
        stop(child)
    assert (metrics.pids.current, metrics.pids.limit) == (1, 50)
    assert metrics.memory.usage_limit == 256 << 20
    assert 8 << 20 < metrics.memory.usage < 256 << 20
    assert metrics.memory.anon >= 8 << 20
    assert metrics.cpu.usage_usec >= 200_000  # µs: most of the 0.3 s of CPU burnt
    assert metrics.cpu.user_usec + metrics.cpu.system_usec > 0
    assert metrics.memory_events.oom_kill == 0


@needs_v2_root
@pytest.mark.timeout(60)
def test_v2_oom_kill_in_a_real_cgroup_is_reported(real_v2: RealV2Cgroup) -> None:
    real_v2.write("memory.max", str(32 << 20))
    real_v2.write("memory.swap.max", "0")
    child = gated_child("hog = b'x' * (512 << 20)")

    try:
        assert asyncio.run(oom_reports(real_v2.enter, child)) == ["hog"]
        assert child.wait(timeout=10) == -signal.SIGKILL  # by the OOM killer
    finally:
        stop(child)


@needs_v2_root
@pytest.mark.timeout(60)
def test_v2_removed_cgroup_is_not_reported_as_oom(real_v2: RealV2Cgroup) -> None:
    child = gated_child("")
    real_v2.enter(child.pid)
    cgroup = Cgroup.for_pid(child.pid)
    open_gate(child)
    assert child.wait(timeout=10) == 0
    stop(child)

    assert asyncio.run(reports_after_removal(cgroup, real_v2.remove)) == []
