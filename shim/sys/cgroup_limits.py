"""OCI LinuxResources written into a cgroup's files, as runc writes them: the wasm backend's
own cgroups, and a gVisor sandbox's when runsc has no `update`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from shim.sys.cgroups import Cgroup
from shim.ttrpc.errors import Code, TtrpcError

_DEFAULT_CFS_PERIOD = 100000  # µs, the kernel's default


# What set_resources writes, per LinuxResources section.
APPLIED = {"memory": {"limit", "swap"}, "cpu": {"shares", "quota", "period"}, "pids": {"limit"}}


def unapplied(resources: Mapping[str, Any]) -> list[str]:
    """The settings of an Update that set_resources would not write (cpusets, block I/O,
    memory reservation...), as "section.field"; unset, zero or empty values do not count
    (docker sends every field)."""
    found = []
    for section, values in resources.items():
        if section == "devices":
            # The device allow list, restated unchanged with every CRI update: access is the
            # container's own matter (a module has no devices; gVisor's sentry checks them).
            continue
        if not isinstance(values, Mapping):
            if values:
                found.append(section)
            continue
        for name, value in values.items():
            if value and name not in APPLIED.get(section, set()):
                found.append(f"{section}.{name}")
    return found


def refuse_unapplied(resources: Mapping[str, Any], backend: str) -> None:
    """Update answers Unimplemented, before writing anything, for settings it cannot apply:
    a silent success would claim a limit that is not there."""
    names = unapplied(resources)
    if names:
        raise TtrpcError(
            Code.UNIMPLEMENTED,
            f"{backend} cannot set {', '.join(names)}: it sets only the memory limit and swap, "
            "CPU shares and quota, and the pids limit",
        )


def set_resources(cgroup: Cgroup, resources: Mapping[str, Any]) -> None:
    """Write the memory, CPU and pids limits of OCI LinuxResources (what Update and the spec
    give) into cgroup's files, as runc does."""
    _set_memory(cgroup, resources.get("memory") or {})
    _set_cpu(cgroup, resources.get("cpu") or {})
    pids = resources.get("pids") or {}
    if pids.get("limit") is not None:
        _write(cgroup, "pids", "pids.max", "max" if pids["limit"] <= 0 else str(pids["limit"]))


def _set_memory(cgroup: Cgroup, memory: Mapping[str, Any]) -> None:
    limit, swap = memory.get("limit"), memory.get("swap")
    if cgroup.version == 2:
        if limit is not None:
            _write(cgroup, "memory", "memory.max", _limit(limit, v1=False))
        if swap is not None:  # v2 limits swap alone
            swap_only = swap if swap < 0 or limit is None else swap - limit
            _write(cgroup, "memory", "memory.swap.max", _limit(swap_only, v1=False))
        return
    writes = []
    if limit is not None:
        writes.append(("memory.limit_in_bytes", _limit(limit, v1=True)))
    if swap is not None:  # v1 limits memory+swap, which may never go below memory
        writes.append(("memory.memsw.limit_in_bytes", _limit(swap, v1=True)))
        current = int(_read(cgroup, "memory", "memory.limit_in_bytes"))
        if swap < 0 or current < swap:  # raising: memsw first, as runc orders them
            writes.reverse()
    for name, value in writes:
        _write(cgroup, "memory", name, value)


def _set_cpu(cgroup: Cgroup, cpu: Mapping[str, Any]) -> None:
    """Shares and the CFS quota, mapped to v2's weight and cpu.max as runc maps them."""
    shares, quota, period = cpu.get("shares"), cpu.get("quota"), cpu.get("period")
    if cgroup.version == 1:
        if shares:
            _write(cgroup, "cpu", "cpu.shares", str(shares))
        if period:
            _write(cgroup, "cpu", "cpu.cfs_period_us", str(period))
        if quota:
            _write(cgroup, "cpu", "cpu.cfs_quota_us", str(quota))
        return
    if shares:
        _write(cgroup, "", "cpu.weight", str(cpu_weight(shares)))
    if quota or period:
        limit = "max" if not quota or quota < 0 else str(quota)
        _write(cgroup, "", "cpu.max", f"{limit} {period or _DEFAULT_CFS_PERIOD}")


def cpu_weight(shares: int) -> int:
    """cgroup v2's cpu.weight [1, 10000] for v1 cpu.shares [2, 262144], runc's formula."""
    return 1 + ((min(max(shares, 2), 262144) - 2) * 9999) // 262142


def _limit(value: int, v1: bool) -> str:
    if value < 0:
        return "-1" if v1 else "max"
    return str(value)


def _write(cgroup: Cgroup, controller: str, name: str, value: str) -> None:
    with open(os.path.join(cgroup.path(controller), name), "w") as f:
        f.write(value)


def _read(cgroup: Cgroup, controller: str, name: str) -> str:
    with open(os.path.join(cgroup.path(controller), name)) as f:
        return f.read()
