"""What the cgroup e2e tests share: Update and Stats sent to a shim as containerd sends them
(ctr 1.6 has no `tasks update`; `ctr tasks metrics` hides the type), a task's limits read back
from its cgroup, and its metrics checked for real values, on cgroup v1 or v2."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from harness import PrivateContainerd

from shim.api.cgroups.v1 import metrics_pb2 as v1
from shim.api.cgroups.v2 import metrics_pb2 as v2
from shim.api.task.v2 import shim_pb2 as api
from shim.sys.cgroups import V1_METRICS_URL, V2_METRICS_URL, Cgroup
from shim.ttrpc.client import Client

TASK = "containerd.task.v2.Task"
R = TypeVar("R", bound=Message)
LINUX_RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
# What the Update tests set, and how each cgroup version shows it.
UPDATE = {
    "memory": {"limit": 48 * 1024 * 1024},
    "pids": {"limit": 40},
    "cpu": {"shares": 512, "quota": 50000, "period": 100000},
}
V1_LIMITS = {
    ("memory", "memory.limit_in_bytes"): str(48 * 1024 * 1024),
    ("pids", "pids.max"): "40",
    ("cpu", "cpu.shares"): "512",
    ("cpu", "cpu.cfs_quota_us"): "50000",
    ("cpu", "cpu.cfs_period_us"): "100000",
}
V2_LIMITS = {
    ("memory", "memory.max"): str(48 * 1024 * 1024),
    ("pids", "pids.max"): "40",
    ("cpu", "cpu.weight"): "20",  # runc's mapping of 512 shares
    ("cpu", "cpu.max"): "50000 100000",
}


def call_shim(
    containerd: PrivateContainerd, name: str, method: str, request: Message, response: type[R]
) -> R:
    """One Task API call to the shim of task `name`, over its own socket."""
    address = (containerd.bundle(name) / "address").read_text().removeprefix("unix://")

    async def call() -> R:
        client = await Client.connect(address)
        try:
            return await client.call(TASK, method, request, response, timeout=30)
        finally:
            await client.close()

    return asyncio.run(call())


def update_task(containerd: PrivateContainerd, name: str, resources: Mapping[str, Any]) -> None:
    packed = AnyProto(type_url=LINUX_RESOURCES_URL, value=json.dumps(resources).encode())
    call_shim(containerd, name, "Update", api.UpdateTaskRequest(id=name, resources=packed), Empty)


def host_cgroup_version() -> int:
    return 2 if Path("/sys/fs/cgroup/cgroup.controllers").is_file() else 1


def assert_real_metrics(containerd: PrivateContainerd, name: str) -> None:
    """Stats gives the metrics type of this host's cgroup version, with a process counted,
    memory in use and CPU time spent."""
    stats = call_shim(containerd, name, "Stats", api.StatsRequest(id=name), api.StatsResponse)
    if host_cgroup_version() == 2:
        assert stats.stats.type_url == V2_METRICS_URL
        metrics2 = v2.Metrics.FromString(stats.stats.value)
        assert metrics2.pids.current >= 1, metrics2
        assert metrics2.memory.usage > 0, metrics2
        assert metrics2.cpu.usage_usec > 0, metrics2
    else:
        assert stats.stats.type_url == V1_METRICS_URL
        metrics1 = v1.Metrics.FromString(stats.stats.value)
        assert metrics1.pids.current >= 1, metrics1
        assert metrics1.memory.usage.usage > 0, metrics1
        assert metrics1.cpu.usage.total > 0, metrics1


def limits_after_update(pid: int) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    """The UPDATE limits read from the cgroup of `pid`, and what they should be on its
    cgroup version."""
    cgroup = Cgroup.for_pid(pid)
    expected = V1_LIMITS if cgroup.version == 1 else V2_LIMITS
    found = {
        (controller, name): Path(cgroup.path(controller), name).read_text().strip()
        for controller, name in expected
    }
    return found, expected
