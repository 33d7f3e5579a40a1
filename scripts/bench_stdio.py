#!/usr/bin/env python3
"""Stdout throughput of our shim against containerd's Go shim, in one run under one private
containerd (issue 4).

    .venv/bin/python scripts/bench_stdio.py [--size-mib 200] [--repeats 5] [--json PATH]

For each runtime a long-lived container runs; each sample is an exec of
`dd if=/dev/zero bs=1M count=N`, whose stdout goes container -> pipe -> shim -> FIFO -> ctr ->
pipe -> this script. The reader (ctr, then 1 MiB reads here) is the same for both shims. Samples
alternate between the shims (and which goes first), so a drift of the machine hits both alike.
Throughput is timed from the first byte read to the last, so the exec set-up is not in it; CPU
is the shim process's utime+stime (all its threads) over the same window. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "e2e")]

from harness import (  # noqa: E402
    DEFAULT_VERSION,
    GO_RUNTIME,
    PYRUNC_RUNTIME,
    HarnessError,
    PrivateContainerd,
    unusable_reason,
)

MIB = 1 << 20
READ_SIZE = MIB
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def measure_stdio(
    containerd: PrivateContainerd, runtimes: Mapping[str, str], size_mb: int, repeats: int
) -> dict[str, Any]:
    """Throughput (MiB/s per sample and median) and shim CPU seconds per GiB copied of each
    runtime (name -> runtime type), plus the ratio of the first runtime's median MiB/s to each
    other's. `size_mb` is in MiB."""
    containers = {name: f"stdio-bench-{name}" for name in runtimes}
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    cpu_s = dict.fromkeys(runtimes, 0.0)
    copied = dict.fromkeys(runtimes, 0)
    try:
        for name, runtime in runtimes.items():
            containerd.run_detached(containers[name], "sleep", "1000000", runtime=runtime)
        shims = {name: shim_pid(containerd, cid) for name, cid in containers.items()}
        order = list(runtimes)
        for repeat in range(repeats):
            for name in order if repeat % 2 == 0 else reversed(order):
                mib_per_s, cpu, size = one_sample(
                    containerd, containers[name], f"out{repeat}", shims[name], size_mb
                )
                samples[name].append(mib_per_s)
                cpu_s[name] += cpu
                copied[name] += size
    finally:
        for cid in containers.values():
            containerd.kill_and_delete(cid, check=False)
    result: dict[str, Any] = {
        "size_mib": size_mb,
        "repeats": repeats,
        "reader": "ctr tasks exec, its stdout piped to this script",
        "runtimes": {
            name: {
                "runtime": runtime,
                "mib_per_s": [round(s, 1) for s in samples[name]],
                "median_mib_per_s": round(statistics.median(samples[name]), 1),
                "cpu_s_per_gib": round(cpu_s[name] / (copied[name] / (1 << 30)), 3),
            }
            for name, runtime in runtimes.items()
        },
    }
    first, *others = runtimes
    medians = {name: statistics.median(samples[name]) for name in runtimes}
    result["ratios"] = {f"{first}/{o}": round(medians[first] / medians[o], 2) for o in others}
    return result


def one_sample(
    containerd: PrivateContainerd, container_id: str, exec_id: str, shim: int, size_mib: int
) -> tuple[float, float, int]:
    """(MiB/s from the first byte to the last, shim CPU seconds meanwhile, bytes copied
    meanwhile) of one exec writing `size_mib` MiB of zeros to stdout."""
    command = ("dd", "if=/dev/zero", f"bs={MIB}", f"count={size_mib}")
    ctr = containerd.start_ctr(
        "tasks", "exec", "--exec-id", exec_id, container_id, *command,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert ctr.stdout is not None
    try:
        stdout = ctr.stdout.fileno()
        first = len(os.read(stdout, READ_SIZE))
        started, cpu_before = time.monotonic(), cpu_seconds(shim)
        total, expected = first, size_mib * MIB
        while total < expected:
            chunk = len(os.read(stdout, READ_SIZE))
            if not chunk:
                raise HarnessError(f"{container_id}: stdout ended after {total} of {expected} B")
            total += chunk
        elapsed, cpu_after = time.monotonic() - started, cpu_seconds(shim)
        if os.read(stdout, READ_SIZE) or ctr.wait(timeout=60) != 0:
            raise HarnessError(f"{container_id}: exec wrote more than {expected} B or failed")
    finally:
        ctr.kill()
        ctr.wait(timeout=10)
        ctr.stdout.close()
    copied = total - first
    return copied / MIB / elapsed, cpu_after - cpu_before, copied


def shim_pid(containerd: PrivateContainerd, container_id: str) -> int:
    """The shim of a running container: its init's parent, since a shim is a subreaper and
    the runtime that started the init has exited."""
    pid = containerd.task_pid(container_id)
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    if parent not in containerd.shim_pids():
        raise HarnessError(f"{container_id}: parent {parent} of {pid} is no shim")
    return parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def table(result: dict[str, Any]) -> str:
    rows = [f"{'shim':<6} {'runtime':<26} {'median MiB/s':>12} {'CPU s/GiB':>10}  samples MiB/s"]
    for name, figures in result["runtimes"].items():
        rows.append(
            f"{name:<6} {figures['runtime']:<26} {figures['median_mib_per_s']:>12.1f}"
            f" {figures['cpu_s_per_gib']:>10.3f}  {figures['mib_per_s']}"
        )
    rows += [f"ratio {pair}: {ratio:.2f}x" for pair, ratio in result["ratios"].items()]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--containerd", default=DEFAULT_VERSION)
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    reason = unusable_reason()
    if reason:
        print(f"bench_stdio: cannot run containers here: {reason}", file=sys.stderr)
        return 1
    runtimes = {"ours": PYRUNC_RUNTIME, "go": GO_RUNTIME}
    try:
        with PrivateContainerd(version=args.containerd, namespace="pyshim-bench") as ctrd:
            result = measure_stdio(ctrd, runtimes, args.size_mib, args.repeats)
    except HarnessError as error:
        print(f"bench_stdio: {error}", file=sys.stderr)
        return 1
    result["containerd"] = args.containerd
    print(f"stdout of `dd` through the shim to ctr, {args.size_mib} MiB x {args.repeats}")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
