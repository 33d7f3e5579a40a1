"""Checkpoint and restore of a container holding 64 MiB of touched memory, for scripts/bench:
through containerd (`ctr containers checkpoint --task --rw`, then `ctr containers restore
--live --rw` once the task and container are gone), or with runsc's own CLI on a bundle of
its own (`runsc checkpoint --image-path` / `runsc restore`, in a private --root).

The workload is busybox `dd` reading 64 MiB of /dev/urandom into one buffer (read() writes
every page of it), then blocking on a pipe nobody reads: the memory stays resident in a running
process, which CRIU (or gVisor's state file) must save. Before each checkpoint, an exec in the
container must see a process with 64 MiB resident; after each restore, the task must run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import PrivateContainerd, wait_until
from runsc_support import removing_ctr_fifos

MEMORY_MIB = 64
# Random bytes: zeros would make a compressed image (runsc's) tell nothing of the memory.
WORKLOAD = (
    "sh", "-c",
    f"dd if=/dev/urandom bs={MEMORY_MIB}M count=1 iflag=fullblock | sleep 1000000",
)  # fmt: skip
# Every process's status, the glob expanded by the container's shell.
STATUS_ALL = ("sh", "-c", "cat /proc/[0-9]*/status 2>/dev/null")
STEP_TIMEOUT = 600.0  # seconds for one checkpoint or restore: a TCG guest is slow
RSS_TIMEOUT = 180.0
BUSYBOX = Path("/bin/busybox")  # static: the runsc bundle's only program
APPLETS = ("sh", "dd", "sleep", "cat")


@dataclass(frozen=True)
class Sample:
    checkpoint_s: float
    restore_s: float
    image_mb: float


def largest_rss_kib(status_text: str) -> int:
    """The largest VmRSS (kB) among the /proc/PID/status files concatenated in status_text."""
    lines = status_text.splitlines()
    return max((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), default=0)


def wait_for_memory(read_status: Callable[[], str]) -> None:
    """Until a process of the container holds MEMORY_MIB resident (dd has filled its buffer)."""
    want = MEMORY_MIB * 1024
    if not wait_until(lambda: largest_rss_kib(read_status()) >= want, RSS_TIMEOUT, interval=1):
        raise RuntimeError(f"no process of the container reached {MEMORY_MIB} MiB resident")


def through_containerd(ctrd: PrivateContainerd, runtime: str, name: str) -> Sample:
    """One checkpoint and restore of WORKLOAD under `runtime`; everything removed after."""
    ref = f"localhost/pyshim-bench/{name}:1"
    try:
        ctrd.ctr("run", "-d", "--runtime", runtime, ctrd.image, name, *WORKLOAD)
        wait_for_memory(lambda: ctrd.exec_output(name, *STATUS_ALL))
        started = time.perf_counter()
        ctrd.ctr("containers", "checkpoint", "--task", "--rw", name, ref, timeout=STEP_TIMEOUT)
        checkpoint_s = time.perf_counter() - started
        image_mb = image_size(ctrd, ref) / 1e6
        ctrd.kill_and_delete(name)
        with removing_ctr_fifos(name):
            started = time.perf_counter()
            restore = ("containers", "restore", "--live", "--rw", name, ref)
            ctrd.ctr(*restore, timeout=STEP_TIMEOUT)
            restore_s = time.perf_counter() - started
        if ctrd.task_status(name) != "RUNNING":
            raise RuntimeError(f"restored {name} is {ctrd.task_status(name)}, not RUNNING")
        return Sample(checkpoint_s, restore_s, image_mb)
    finally:
        ctrd.kill_and_delete(name, check=False)
        ctrd.ctr("images", "rm", ref, check=False)


def image_size(ctrd: PrivateContainerd, ref: str) -> int:
    """Bytes of the checkpoint image: the parts its index lists (CRIU's or runsc's image, the
    rw layer's diff, the spec, the options)."""
    [digest] = [row.split()[2] for row in ctrd.ctr("images", "ls").stdout.splitlines()[1:]
                if row.split()[0] == ref]  # fmt: skip
    index = json.loads(ctrd.ctr("content", "get", digest).stdout)
    return sum(int(part["size"]) for part in index["manifests"])


def with_runsc_cli(name: str) -> Sample:
    """One checkpoint and restore of WORKLOAD by `runsc` itself (--network=none), on a bundle
    whose rootfs is the static busybox and its applets, in a private root; all removed after."""
    with tempfile.TemporaryDirectory(prefix="pyshim-bench-runsc-") as work:
        root, bundle, image = Path(work, "root"), Path(work, "bundle"), Path(work, "image")
        make_bundle(bundle)
        image.mkdir()

        def runsc(*args: str, timeout: float = 60) -> str:
            # Errors to a file: a detached container keeps runsc's stdio, a pipe would not close.
            argv = ["runsc", "--root", str(root), "--network=none", *args]
            detached = "--detach" in args
            with open(Path(work, "stderr"), "w+") as errors:
                done = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stderr=errors, text=True, timeout=timeout,
                    stdout=subprocess.DEVNULL if detached else subprocess.PIPE,
                )  # fmt: skip
                errors.seek(0)
                if done.returncode != 0:
                    raise RuntimeError(f"{shlex.join(argv)} failed: {errors.read()[-500:]}")
            return done.stdout or ""

        try:
            runsc("run", "--detach", "--bundle", str(bundle), name)
            wait_for_memory(lambda: runsc("exec", name, *STATUS_ALL))
            started = time.perf_counter()
            runsc("checkpoint", "--image-path", str(image), name, timeout=STEP_TIMEOUT)
            checkpoint_s = time.perf_counter() - started
            image_mb = sum(f.stat().st_size for f in image.rglob("*") if f.is_file()) / 1e6
            runsc("delete", "--force", name)
            started = time.perf_counter()
            restore = ("restore", "--detach", "--image-path", str(image), "--bundle", str(bundle))
            runsc(*restore, name, timeout=STEP_TIMEOUT)
            restore_s = time.perf_counter() - started
            status = json.loads(runsc("state", name))["status"]
            if status != "running":
                raise RuntimeError(f"runsc restored {name} {status}, not running")
            return Sample(checkpoint_s, restore_s, image_mb)
        finally:
            subprocess.run(
                ["runsc", "--root", str(root), "delete", "--force", name],
                capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
            )  # fmt: skip


def make_bundle(bundle: Path) -> None:
    """An OCI bundle running WORKLOAD: `runsc spec`'s, without a terminal."""
    bin_dir = bundle / "rootfs" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bin_dir / "busybox")
    for applet in APPLETS:
        (bin_dir / applet).symlink_to("busybox")
    subprocess.run(
        ["runsc", "spec", "--bundle", str(bundle), "--", *WORKLOAD],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
