"""The cgroup a wasm container's processes run in: made from the spec's cgroupsPath, removed at
delete. runc does this for Linux containers; here the shim does it for its wasm children."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

from shim.sys.busy import retry_while_busy
from shim.sys.cgroup_limits import set_resources
from shim.sys.cgroups import Cgroup

# cpuset needs cpus and mems copied in before it takes a process; wasm has no use for it.
_V1_SKIPPED = {"cpuset"}
_V2_CONTROLLERS = ("cpu", "io", "memory", "pids")
_FREEZE_TIMEOUT = 5.0
_FREEZE_POLL = 0.01
_REMOVE_RETRIES = 50  # rmdir is EBUSY until the last killed process is gone
_REMOVE_DELAY = 0.02


def cgroup_path(spec: Mapping[str, Any], namespace: str, container_id: str) -> str:
    """The spec's linux.cgroupsPath (cgroupfs style), or /<namespace>/<id> like ctr's default."""
    path = str(spec.get("linux", {}).get("cgroupsPath") or f"/{namespace}/{container_id}")
    if ":" in path:
        raise ValueError(f"cgroupsPath {path!r}: systemd cgroups are not supported")
    return "/" + path.strip("/")


class ContainerCgroup:
    def __init__(self, path: str) -> None:
        self._path = path
        self.cgroup = Cgroup.at(path)
        skipped = set()
        if self.cgroup.version == 1:
            for controller in _V1_SKIPPED:
                with contextlib.suppress(FileNotFoundError):
                    skipped.add(self.cgroup.path(controller))
        self._dirs = [d for d in self.cgroup.directories() if d not in skipped]

    def create(self) -> None:
        if self.cgroup.version == 2:
            self._enable_v2_controllers()
        for directory in self._dirs:
            os.makedirs(directory, exist_ok=True)

    def add(self, pid: int) -> None:
        for directory in self._dirs:
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def pids(self) -> list[int]:
        try:
            return self.cgroup.pids()
        except FileNotFoundError:
            return []

    def signal_all(self, signum: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def set_resources(self, resources: Mapping[str, Any]) -> None:
        """The memory, CPU and pids limits of OCI LinuxResources (what Update and the spec
        give)."""
        set_resources(self.cgroup, resources)

    async def set_frozen(self, frozen: bool) -> None:
        """Freeze or thaw every process, and wait until the kernel says it is done."""
        self._write_freeze(frozen)

        def done() -> bool:
            if self.cgroup.version == 1:
                state = self._read("freezer", "freezer.state").strip()
                return state == ("FROZEN" if frozen else "THAWED")
            return f"frozen {int(frozen)}" in self._read("", "cgroup.events").splitlines()

        deadline = time.monotonic() + _FREEZE_TIMEOUT
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"cgroup did not become {'frozen' if frozen else 'thawed'}")
            await asyncio.sleep(_FREEZE_POLL)

    def kill_all(self) -> None:
        """SIGKILL every process, and thaw them: a frozen process dies only once thawed."""
        self.signal_all(signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._write_freeze(False)

    def remove(self) -> None:
        """Kill what is left and remove the directories (missing ones are fine)."""
        self.kill_all()
        for directory in self._dirs:
            _remove_dir(directory)

    def _write_freeze(self, frozen: bool) -> None:
        if self.cgroup.version == 1:
            self._write("freezer", "freezer.state", "FROZEN" if frozen else "THAWED")
        else:
            self._write("", "cgroup.freeze", "1" if frozen else "0")

    def _write(self, controller: str, name: str, value: str) -> None:
        with open(os.path.join(self.cgroup.path(controller), name), "w") as f:
            f.write(value)

    def _read(self, controller: str, name: str) -> str:
        with open(os.path.join(self.cgroup.path(controller), name)) as f:
            return f.read()

    def _enable_v2_controllers(self) -> None:
        """A v2 controller works in a cgroup only if every ancestor delegates it."""
        leaf = self._dirs[0]
        mount_point = leaf.removesuffix(self._path.rstrip("/"))
        parents = self._path.strip("/").split("/")[:-1]
        for depth in range(len(parents) + 1):
            ancestor = os.path.join(mount_point, *parents[:depth])
            os.makedirs(ancestor, exist_ok=True)
            with open(os.path.join(ancestor, "cgroup.controllers")) as f:
                available = set(f.read().split())
            enable = " ".join(f"+{c}" for c in _V2_CONTROLLERS if c in available)
            if enable:
                with open(os.path.join(ancestor, "cgroup.subtree_control"), "w") as f:
                    f.write(enable)


def _remove_dir(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        retry_while_busy(
            lambda: os.rmdir(directory),
            _REMOVE_RETRIES,
            _REMOVE_DELAY,
            f"cgroup {directory} still has processes",
        )
