"""The VM's settings: a TOML file named by the runtime options (``ctr --runtime-config-path``,
CRI ``ConfigPath``), its ``[vm]`` table over the defaults; the spec's limits add to them.

    [vm]
    vcpus = 1              # before the spec's CPU quota is added
    memory_mb = 512        # before the spec's memory limit is added
    kernel_args = []       # appended to the kernel command line
    accel = "auto"         # kvm | tcg | auto (probe once, cached)
    assets_dir = "/var/lib/pyshim/vm"  # the kernel, guest images and templates (pyshim assets)
    kernel_dir = ""        # an unpacked kernel (scripts/fetch-kernel's); "" = <assets_dir>/kernel
    templates = true       # start VMs from saved templates
    busybox = "/bin/busybox"
    boot_timeout = 120.0   # seconds until the guest agent answers
    guest_runtime = "crun" # the OCI runtime in the guest: crun | runc (runc for checkpoints:
                           # Debian's crun has no CRIU); crun because a C program starts far
                           # faster than Go runc under TCG (README: pykata's guest runtime)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shim.runtimes.options import read_toml_config
from shim.ttrpc.errors import Code, TtrpcError
from shim.vm.assets import VmAssets
from shim.vm.image import GUEST_RUNTIMES

CONFIG_TYPE_URL = "io.containerd.pykata.v1.options"
REPO = Path(__file__).resolve().parents[2]  # the guest runs this package from the host's copy
MAX_VCPUS = os.cpu_count() or 1


@dataclass(frozen=True)
class KataConfig:
    vcpus: int = 1
    memory_mb: int = 512
    kernel_args: tuple[str, ...] = ()
    accel: str = "auto"
    assets_dir: str = str(VmAssets.DEFAULT_ROOT)
    kernel_dir: str = ""
    templates: bool = True
    busybox: str = "/bin/busybox"
    boot_timeout: float = 120.0
    guest_runtime: str = GUEST_RUNTIMES[0]

    @classmethod
    def from_options(cls, options: Any | None) -> KataConfig:
        table = read_toml_config(options, ("", CONFIG_TYPE_URL), "pykata config").get("vm", {})
        return cls.from_table(table)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> KataConfig:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            bad_choice = (key == "accel" and value not in ("auto", "kvm", "tcg")) or (
                key == "guest_runtime" and value not in GUEST_RUNTIMES
            )
            if key not in known or bad_choice:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"pykata config: bad [vm] {key}={value!r}")
            values[key] = tuple(value) if key == "kernel_args" else value
        return cls(**values)

    def assets(self) -> VmAssets:
        return VmAssets(Path(self.assets_dir))

    def kernel_root(self) -> Path:
        """Where the kernel is unpacked: kernel_dir (a checkout's var/kernel), else the assets'."""
        return Path(self.kernel_dir) if self.kernel_dir else self.assets().kernel_dir


@dataclass(frozen=True)
class VmSize:
    vcpus: int
    memory_mb: int


def vm_size(config: KataConfig, spec: Mapping[str, Any]) -> VmSize:
    """The VM of the container (the pod's sandbox under CRI) with this spec: the configured
    size plus room for its CPU quota and memory limit, which its cgroup in the guest enforces."""
    resources = spec.get("linux", {}).get("resources") or {}
    cpu = resources.get("cpu") or {}
    quota, period = cpu.get("quota") or 0, cpu.get("period") or 100_000
    extra_vcpus = math.ceil(quota / period) if quota > 0 else 0
    limit = (resources.get("memory") or {}).get("limit") or 0
    extra_mb = math.ceil(limit / 2**20) if limit > 0 else 0
    return VmSize(min(config.vcpus + extra_vcpus, MAX_VCPUS), config.memory_mb + extra_mb)
