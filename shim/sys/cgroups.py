"""A container's cgroup and its statistics as containerd's cgroups Metrics (PROTOCOL K).

Like containerd, a hybrid host (v1 controllers plus a unified mount) counts as v1; only a pure
unified hierarchy is v2. Files are read the way containerd/cgroups reads them, so `ctr task
metrics` shows the same numbers as with the Go shim.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from google.protobuf import any_pb2

from shim.api.cgroups.v1 import metrics_pb2 as v1
from shim.api.cgroups.v2 import metrics_pb2 as v2
from shim.sys.mount import mountinfo_field

V1_METRICS_URL = "io.containerd.cgroups.v1.Metrics"
V2_METRICS_URL = "io.containerd.cgroups.v2.Metrics"

_MAX_UINT64 = (1 << 64) - 1
_NANOSECONDS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

# memory.stat key -> v1 MemoryStat field (most have the same name).
_V1_MEMORY_STAT_RENAMES = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
    "total_pgpgin": "total_pg_pg_in",
    "total_pgpgout": "total_pg_pg_out",
    "total_pgfault": "total_pg_fault",
    "total_pgmajfault": "total_pg_maj_fault",
}
# MemoryStat entry -> file prefix of its usage/max/failcnt/limit files.
_V1_MEMORY_ENTRIES = {
    "usage": "memory",
    "swap": "memory.memsw",
    "kernel": "memory.kmem",
    "kernel_tcp": "memory.kmem.tcp",
}
# BlkIOStat field -> file; the CFQ/BFQ-era set first, the throttle set when that has nothing.
_V1_BLKIO_FILES = {
    "sectors_recursive": "blkio.sectors_recursive",
    "io_service_bytes_recursive": "blkio.io_service_bytes_recursive",
    "io_serviced_recursive": "blkio.io_serviced_recursive",
    "io_queued_recursive": "blkio.io_queued_recursive",
    "io_service_time_recursive": "blkio.io_service_time_recursive",
    "io_wait_time_recursive": "blkio.io_wait_time_recursive",
    "io_merged_recursive": "blkio.io_merged_recursive",
    "io_time_recursive": "blkio.time_recursive",
}
_V1_BLKIO_THROTTLE_FILES = {
    "io_serviced_recursive": "blkio.throttle.io_serviced",
    "io_service_bytes_recursive": "blkio.throttle.io_service_bytes",
}
_V2_MEMORY_FILES = {
    "usage": "memory.current",
    "usage_limit": "memory.max",
    "swap_usage": "memory.swap.current",
    "swap_limit": "memory.swap.max",
}


@dataclass(frozen=True)
class _Mount:
    root: str  # the hierarchy path mounted here
    mount_point: str


class Cgroup:
    """The cgroup of one process: per-controller directories (v1) or one directory (v2)."""

    def __init__(self, version: int, dirs: Mapping[str, str]) -> None:
        """`dirs`: controller name -> directory for v1; for v2 a single "" -> directory."""
        self.version = version
        self._dirs = dict(dirs)

    @classmethod
    def for_pid(cls, pid: int) -> Cgroup:
        """The cgroup `pid` is in; FileNotFoundError if the process or its cgroup is gone."""
        with open(f"/proc/{pid}/cgroup") as f:
            membership = f.read()
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        cgroup = cls.from_proc(membership, mountinfo)
        if not any(os.path.isdir(d) for d in cgroup._dirs.values()):
            raise FileNotFoundError(f"the cgroup of pid {pid} does not exist any more")
        return cgroup

    @classmethod
    def from_proc(cls, membership: str, mountinfo: str) -> Cgroup:
        """From the texts of /proc/<pid>/cgroup and /proc/self/mountinfo."""
        paths = {}  # controller ("" for the unified hierarchy) -> path in its hierarchy
        for line in membership.splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
        v1_mounts, unified_mount = _cgroup_mounts(mountinfo)
        v1_controllers = [c for c in paths if c and not c.startswith("name=")]
        if not v1_controllers:
            if unified_mount is None:
                raise FileNotFoundError("no cgroup2 filesystem mounted")
            return cls(2, {"": _join(unified_mount, paths[""])})
        dirs = {c: _join(v1_mounts[c], paths[c]) for c in v1_controllers if c in v1_mounts}
        return cls(1, dirs)

    @classmethod
    def at(cls, path: str) -> Cgroup:
        """The cgroup at hierarchy path `path` (v1: in each mounted controller's hierarchy),
        whether or not its directories exist yet."""
        with open("/proc/self/mountinfo") as f:
            v1_mounts, unified_mount = _cgroup_mounts(f.read())
        with open("/proc/cgroups") as f:  # subsys_name hierarchy num_cgroups enabled
            rows = [line.split() for line in f if not line.startswith("#")]
        controllers = [row[0] for row in rows if row[1] != "0" and row[3] == "1"]
        dirs = {c: _join(v1_mounts[c], path) for c in controllers if c in v1_mounts}
        if dirs:
            return cls(1, dirs)
        if unified_mount is None:
            raise FileNotFoundError("no cgroup filesystem mounted")
        return cls(2, {"": _join(unified_mount, path)})

    def directories(self) -> list[str]:
        """Every directory of this cgroup (v1: one per controller hierarchy)."""
        return list(dict.fromkeys(self._dirs.values()))

    def path(self, controller: str) -> str:
        """The directory holding `controller`'s files (v2: the one directory)."""
        try:
            return self._dirs[controller if self.version == 1 else ""]
        except KeyError:
            raise FileNotFoundError(f"cgroup controller {controller} is not mounted") from None

    def pids(self) -> list[int]:
        """Every process in the cgroup and its descendants."""
        top = self._dirs.get("pids") or self._dirs.get("memory") or next(iter(self._dirs.values()))
        found: list[int] = []
        for directory, _, _ in os.walk(top):
            with open(os.path.join(directory, "cgroup.procs")) as f:
                found.extend(int(line) for line in f)
        return found

    def stats(self) -> any_pb2.Any:
        """io.containerd.cgroups.v1.Metrics or .v2.Metrics, packed with a bare type URL."""
        if self.version == 1:
            return any_pb2.Any(type_url=V1_METRICS_URL, value=self._v1_stats().SerializeToString())
        return any_pb2.Any(type_url=V2_METRICS_URL, value=self._v2_stats().SerializeToString())

    def _v1_stats(self) -> v1.Metrics:
        metrics = v1.Metrics()
        if "pids" in self._dirs:
            _v1_pids(self._dirs["pids"], metrics.pids)
        if "cpuacct" in self._dirs:
            _v1_cpu_usage(self._dirs["cpuacct"], metrics.cpu.usage)
        if "cpu" in self._dirs:
            _v1_throttling(self._dirs["cpu"], metrics.cpu.throttling)
        if "memory" in self._dirs:
            _v1_memory(self._dirs["memory"], metrics)
        if "hugetlb" in self._dirs:
            metrics.hugetlb.extend(_v1_hugetlb(self._dirs["hugetlb"]))
        if "blkio" in self._dirs:
            _v1_blkio(self._dirs["blkio"], metrics.blkio)
        return metrics

    def _v2_stats(self) -> v2.Metrics:
        directory = self._dirs[""]
        metrics = v2.Metrics()
        metrics.pids.current = _read_uint(directory, "pids.current")
        metrics.pids.limit = _read_uint(directory, "pids.max")
        cpu = _read_key_values(directory, "cpu.stat")
        for field in ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled"):
            setattr(metrics.cpu, field, cpu.get(field, 0))
        metrics.cpu.throttled_usec = cpu.get("throttled_usec", 0)
        memory = _read_key_values(directory, "memory.stat")
        for field in v2.MemoryStat.DESCRIPTOR.fields_by_name:
            if field in memory:
                setattr(metrics.memory, field, memory[field])
        for field, name in _V2_MEMORY_FILES.items():
            setattr(metrics.memory, field, _read_uint(directory, name))
        events = _read_key_values(directory, "memory.events")
        if events:
            for field in ("low", "high", "max", "oom", "oom_kill"):
                setattr(metrics.memory_events, field, events.get(field, 0))
        metrics.io.usage.extend(_v2_io(directory))
        metrics.hugetlb.extend(_v2_hugetlb(directory))
        return metrics


def _cgroup_mounts(mountinfo: str) -> tuple[dict[str, _Mount], _Mount | None]:
    """v1 mounts by controller, and the unified (cgroup2) mount, from mountinfo."""
    v1_mounts: dict[str, _Mount] = {}
    unified = None
    for line in mountinfo.splitlines():
        fields = line.split()
        separator = fields.index("-")
        fs_type, super_options = fields[separator + 1], fields[separator + 3]
        mount = _Mount(root=fields[3], mount_point=mountinfo_field(fields[4]))
        if fs_type == "cgroup2" and unified is None:
            unified = mount
        elif fs_type == "cgroup":
            for option in super_options.split(","):
                v1_mounts.setdefault(option, mount)
    return v1_mounts, unified


def _join(mount: _Mount, path: str) -> str:
    # Paths outside the mounted root show up in a cgroup namespace; use them as they are.
    inside = os.path.commonpath([path, mount.root]) == mount.root
    relative = os.path.relpath(path, mount.root) if inside else path
    return os.path.normpath(os.path.join(mount.mount_point, relative.lstrip("/")))


def _read_text(directory: str, name: str) -> str | None:
    """A cgroup file's content, or None when this kernel/cgroup does not have it."""
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _parse_uint(text: str) -> int:
    """A cgroup number: "max" is unlimited; negative values (v1 "-1") count as 0."""
    text = text.strip()
    if text == "max":
        return _MAX_UINT64
    return max(int(text), 0)


def _read_uint(directory: str, name: str) -> int:
    text = _read_text(directory, name)
    return _parse_uint(text) if text else 0


def _read_key_values(directory: str, name: str) -> dict[str, int]:
    """A flat-keyed file ("key value" lines), e.g. memory.stat; empty if missing."""
    values = {}
    for line in (_read_text(directory, name) or "").splitlines():
        key, _, value = line.partition(" ")
        if value:
            values[key] = _parse_uint(value)
    return values


def _v1_pids(directory: str, pids: v1.PidsStat) -> None:
    pids.current = _read_uint(directory, "pids.current")
    limit = (_read_text(directory, "pids.max") or "").strip()
    pids.limit = 0 if limit in ("max", "") else _parse_uint(limit)


def _v1_cpu_usage(directory: str, usage: v1.CPUUsage) -> None:
    usage.total = _read_uint(directory, "cpuacct.usage")
    usage.per_cpu.extend(
        int(v) for v in (_read_text(directory, "cpuacct.usage_percpu") or "").split()
    )
    ticks = _read_key_values(directory, "cpuacct.stat")
    usage.user = ticks.get("user", 0) * _NANOSECONDS_PER_TICK
    usage.kernel = ticks.get("system", 0) * _NANOSECONDS_PER_TICK


def _v1_throttling(directory: str, throttling: v1.Throttle) -> None:
    stat = _read_key_values(directory, "cpu.stat")
    throttling.periods = stat.get("nr_periods", 0)
    throttling.throttled_periods = stat.get("nr_throttled", 0)
    throttling.throttled_time = stat.get("throttled_time", 0)


def _v1_memory(directory: str, metrics: v1.Metrics) -> None:
    memory = metrics.memory
    fields = v1.MemoryStat.DESCRIPTOR.fields_by_name
    for key, value in _read_key_values(directory, "memory.stat").items():
        field = _V1_MEMORY_STAT_RENAMES.get(key, key)
        if field in fields and field not in _V1_MEMORY_ENTRIES:
            setattr(memory, field, value)
    for field, prefix in _V1_MEMORY_ENTRIES.items():
        entry = getattr(memory, field)
        entry.usage = _read_uint(directory, f"{prefix}.usage_in_bytes")
        entry.max = _read_uint(directory, f"{prefix}.max_usage_in_bytes")
        entry.failcnt = _read_uint(directory, f"{prefix}.failcnt")
        entry.limit = _read_uint(directory, f"{prefix}.limit_in_bytes")
    oom = _read_key_values(directory, "memory.oom_control")
    metrics.memory_oom_control.oom_kill_disable = oom.get("oom_kill_disable", 0)
    metrics.memory_oom_control.under_oom = oom.get("under_oom", 0)
    metrics.memory_oom_control.oom_kill = oom.get("oom_kill", 0)


def _v1_hugetlb(directory: str) -> Iterator[v1.HugetlbStat]:
    for page_size in _hugetlb_page_sizes(directory, ".usage_in_bytes"):
        prefix = f"hugetlb.{page_size}"
        yield v1.HugetlbStat(
            pagesize=page_size,
            usage=_read_uint(directory, f"{prefix}.usage_in_bytes"),
            max=_read_uint(directory, f"{prefix}.max_usage_in_bytes"),
            failcnt=_read_uint(directory, f"{prefix}.failcnt"),
        )


def _v1_blkio(directory: str, blkio: v1.BlkIOStat) -> None:
    devices = _block_device_names()
    for files in (_V1_BLKIO_FILES, _V1_BLKIO_THROTTLE_FILES):
        for field, name in files.items():
            getattr(blkio, field).extend(_v1_blkio_entries(directory, name, devices))
        if any(len(getattr(blkio, field)) for field in files):
            return


def _v1_blkio_entries(
    directory: str, name: str, devices: Mapping[tuple[int, int], str]
) -> Iterator[v1.BlkIOEntry]:
    # Lines: "major:minor [op] value", plus a "Total value" line.
    for line in (_read_text(directory, name) or "").splitlines():
        fields = line.replace(":", " ").split()
        if len(fields) < 3:
            continue
        major, minor = int(fields[0]), int(fields[1])
        op = fields[2] if len(fields) == 4 else ""
        yield v1.BlkIOEntry(
            op=op,
            device=devices.get((major, minor), ""),
            major=major,
            minor=minor,
            value=int(fields[-1]),
        )


def _block_device_names() -> dict[tuple[int, int], str]:
    names: dict[tuple[int, int], str] = {}
    with open("/proc/partitions") as f:
        for line in f.read().splitlines()[2:]:
            major, minor, _, name = line.split()
            names.setdefault((int(major), int(minor)), f"/dev/{name}")
    return names


def _v2_io(directory: str) -> Iterator[v2.IOEntry]:
    # Lines: "major:minor rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N".
    for line in (_read_text(directory, "io.stat") or "").splitlines():
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        values = dict(pair.split("=", 1) for pair in pairs)
        yield v2.IOEntry(
            major=int(major),
            minor=int(minor),
            **{k: int(values.get(k, 0)) for k in ("rbytes", "wbytes", "rios", "wios")},
        )


def _v2_hugetlb(directory: str) -> Iterator[v2.HugeTlbStat]:
    for page_size in _hugetlb_page_sizes(directory, ".current"):
        yield v2.HugeTlbStat(
            pagesize=page_size,
            current=_read_uint(directory, f"hugetlb.{page_size}.current"),
            max=_read_uint(directory, f"hugetlb.{page_size}.max"),
        )


def _hugetlb_page_sizes(directory: str, suffix: str) -> list[str]:
    """Page sizes ("2MB", "1GB") that have a hugetlb.<size><suffix> file."""
    return sorted(
        name.removeprefix("hugetlb.").removesuffix(suffix)
        for name in os.listdir(directory)
        if name.startswith("hugetlb.") and name.endswith(suffix) and name.count(".") == 2
    )
