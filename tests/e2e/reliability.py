"""Load and leak scenarios of issue 5, sized by the caller.

tests/e2e/test_reliability.py runs them short in CI; scripts/soak runs them long. Each scenario
returns the problems it found (empty: nothing lost, nothing leaked). Standard library and the
harness only, so that scripts/soak can import it without pytest.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    DEFAULT_VERSION,
    PYRUNC_RUNTIME,
    EventLog,
    PrivateContainerd,
    mounts_under,
    wait_until,
)

SOCKET_DIR = Path("/run/containerd/s")
RUNC_ROOT = Path("/run/containerd/runc")


def event_body(line: str) -> dict[str, Any]:
    """The JSON of a `ctr events` line: <timestamp (4 words)> <namespace> <topic> <json>."""
    words = line.split(" ", 6)
    try:
        body = json.loads(words[6]) if len(words) > 6 else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def exits(log: EventLog) -> list[dict[str, Any]]:
    """Every /tasks/exit seen, in order of arrival."""
    return [event_body(line) for line in log.lines if " /tasks/exit " in line]


def check_exits(
    seen: list[dict[str, Any]], container_id: str, expected: dict[str, int]
) -> list[str]:
    """Each process of `expected` (exec id, or the container id for its init) exited once
    with its status."""
    mine = [e for e in seen if e.get("container_id") == container_id]
    counts = Counter(e.get("id") for e in mine)
    problems = [f"{container_id}/{i}: {n} exit events" for i, n in counts.items() if n != 1]
    problems += [f"{container_id}/{i}: no exit event" for i in expected if i not in counts]
    for event in mine:
        want = expected.get(event.get("id", ""))
        if want is not None and event.get("exit_status", 0) != want:
            problems.append(f"{container_id}/{event.get('id')}: exit event {event}, want {want}")
    return problems


def socket_of(ctrd: PrivateContainerd, group: str) -> Path:
    """The shim socket containerd would use for a container (shim.manager.socket_path)."""
    key = os.path.join(ctrd.address, ctrd.namespace, group)
    return SOCKET_DIR / hashlib.sha256(key.encode()).hexdigest()


def parallel(count: int, workers: int, job: Callable[[int], list[str]]) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return [problem for found in pool.map(job, range(count)) for problem in found]


def exec_storm(ctrd: PrivateContainerd, execs: int, workers: int) -> list[str]:
    """`execs` short execs into one container, `workers` at a time, then the init's exit."""
    name = "storm"
    ctrd.run_detached(name, "sleep", "100000", runtime=PYRUNC_RUNTIME)

    def exec_one(n: int) -> list[str]:
        argv = ("tasks", "exec", "--exec-id", f"x{n}", name, "sh", "-c", f"exit {n % 256}")
        result = ctrd.ctr(*argv, check=False, timeout=300)
        if result.returncode != n % 256:
            return [f"exec x{n}: ctr exited {result.returncode}: {result.stderr.strip()}"]
        return []

    with ctrd.events(timeout=60) as log:
        problems = parallel(execs, workers, exec_one)
        ctrd.ctr("tasks", "kill", "--signal", "SIGKILL", name)
        log.wait_for("/tasks/exit", f'"id":"{name}"', timeout=60)
    seen = exits(log)
    expected = {f"x{n}": n % 256 for n in range(execs)} | {name: 137}
    problems += check_exits(seen, name, expected)
    init_at = [i for i, e in enumerate(seen) if e.get("id") == name]
    late = [e["id"] for e in seen[init_at[0] + 1 :] if e.get("container_id") == name][:5]
    if init_at and late:
        problems.append(f"exec exits after the init's exit: {late}")
    ctrd.ctr("tasks", "delete", name, check=False)
    ctrd.ctr("containers", "delete", name)
    return problems


def container_churn(ctrd: PrivateContainerd, containers: int, workers: int) -> list[str]:
    """`containers` containers run and removed, `workers` at a time, each with its own status."""

    def run_one(n: int) -> list[str]:
        name = f"churn{n}"
        command = ("run", "--rm", "--runtime", PYRUNC_RUNTIME, ctrd.image, name)
        result = ctrd.ctr(*command, "sh", "-c", f"exit {n % 256}", check=False, timeout=300)
        if result.returncode != n % 256:
            return [f"{name}: ctr exited {result.returncode}: {result.stderr.strip()}"]
        return []

    with ctrd.events(timeout=60) as log:
        problems = parallel(containers, workers, run_one)
    seen = exits(log)
    for n in range(containers):
        problems += check_exits(seen, f"churn{n}", {f"churn{n}": n % 256})
    return problems


@dataclass(frozen=True)
class Footprint:
    """What a containerd and its shims hold; equal before and after a run means no leak."""

    processes: int
    containerd_fds: int
    mounts: int
    state_files: int
    cgroups: int

    def grown(self, before: Footprint) -> list[str]:
        return [
            f"{field}: {getattr(before, field)} -> {getattr(self, field)}"
            for field in self.__dataclass_fields__
            if getattr(self, field) > getattr(before, field)
        ]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _in_namespace_cgroup(pid: int, namespace: str) -> bool:
    try:
        return f":/{namespace}/" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def _files(roots: Iterable[Path]) -> int:
    return sum(len(dirs) + len(files) for root in roots for _, dirs, files in os.walk(root))


def footprint(ctrd: PrivateContainerd) -> Footprint:
    pid = ctrd.pid
    container_processes = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _in_namespace_cgroup(int(p.name), ctrd.namespace)
    ]
    cgroup_root = Path("/sys/fs/cgroup")
    cgroups = [*cgroup_root.glob(f"*/{ctrd.namespace}/*"), *cgroup_root.glob(f"{ctrd.namespace}/*")]
    return Footprint(
        processes=len(ctrd.shim_pids()) + len(container_processes) + len(_children(pid)),
        containerd_fds=len(os.listdir(f"/proc/{pid}/fd")),
        mounts=len(mounts_under(ctrd.base)),
        state_files=_files([ctrd.state, ctrd.fifo_dir, RUNC_ROOT / ctrd.namespace]),
        cgroups=sum(1 for c in cgroups if c.is_dir()),
    )


def lifecycle_leaks(ctrd: PrivateContainerd, lifecycles: int, workers: int) -> list[str]:
    """Run `lifecycles` containers (an exec each) to the end; the footprint must come back."""

    def lifecycle(n: int) -> list[str]:
        name = f"life{n}"
        ctrd.run_detached(name, "sleep", "1000", runtime=PYRUNC_RUNTIME)
        ctrd.ctr("tasks", "exec", "--exec-id", "e", name, "true", timeout=120)
        ctrd.ctr("tasks", "kill", "--signal", "SIGKILL", name)
        # ctr 1.6 has no `tasks wait`: delete fails until the task has stopped.
        if not wait_until(lambda: delete_task(ctrd, name) == 137, timeout=30, interval=0.1):
            return [f"{name}: task not deleted with status 137"]
        ctrd.ctr("containers", "delete", name)
        sock = socket_of(ctrd, name)
        # The daemon removes its socket once it has answered Shutdown: after ctr returns.
        gone = wait_until(lambda: not sock.exists(), timeout=10, interval=0.1)
        return [] if gone else [f"{name}: socket {sock} left"]

    lifecycle(lifecycles)  # warm-up: containerd opens its lazy fds (snapshotter, shim log)
    ctrd.settle()
    before = footprint(ctrd)
    problems = parallel(lifecycles, workers, lifecycle)
    ctrd.settle()
    wait_until(lambda: not footprint(ctrd).grown(before), timeout=20, interval=0.5)
    return problems + footprint(ctrd).grown(before)


def delete_task(ctrd: PrivateContainerd, name: str) -> int | None:
    """Delete a task: its exit status, None if it was not deleted (e.g. still running)."""
    result = ctrd.ctr("tasks", "delete", name, check=False)
    warned = re.search(r"exit with non-zero exit code (\d+)", result.stderr)
    if warned:  # ctr 1.6 and 1.7 warn and exit 0
        return int(warned[1])
    if result.returncode == 0:
        return 0
    return None if "ctr: " in result.stderr else result.returncode  # others exit with it


def soak(version: str, long: bool) -> int:
    """scripts/soak: every scenario, sized for CI or (long) as issue 5 asks."""
    sizes = {"execs": 1000, "exec_workers": 100, "containers": 200, "lifecycles": 500}
    if not long:
        sizes = {"execs": 200, "exec_workers": 50, "containers": 30, "lifecycles": 50}
    with PrivateContainerd(version=version, namespace="pyshim-soak") as ctrd:
        results = {
            f"{sizes['execs']} execs, {sizes['exec_workers']} at a time": exec_storm(
                ctrd, sizes["execs"], sizes["exec_workers"]
            ),
            f"{sizes['containers']} containers run and removed": container_churn(
                ctrd, sizes["containers"], 10
            ),
            f"{sizes['lifecycles']} lifecycles, footprint": lifecycle_leaks(
                ctrd, sizes["lifecycles"], 5
            ),
        }
    for scenario, problems in results.items():
        print(f"{scenario}: {'ok' if not problems else 'LOST OR LEAKED'}")
        for problem in problems[:20]:
            print(f"  {problem}")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="issue 5 soak on a private containerd")
    parser.add_argument("--long", action="store_true", help="1000 execs, 200 containers, 500")
    parser.add_argument("--containerd", default=DEFAULT_VERSION)
    options = parser.parse_args()
    sys.exit(soak(options.containerd, options.long))
