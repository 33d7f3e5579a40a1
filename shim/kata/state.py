"""Where a VM keeps its files on the host, and the cleanup that needs nothing but them.

One directory per VM under /run/pyshim/kata: QEMU's pid, the agent's and QEMU's sockets, the
initrd of a cold boot, the logs and the shared directory (one subdirectory per container: its rootfs
and its bind mounts, bound from the host). Each container's bundle names its VM's directory,
so `delete` after a killed shim finds QEMU, the mounts and the sockets from the bundle alone.
The daemon's mounts are in its own mount namespace (KataRuntime.private_mounts), which ends
with QEMU and the daemon: `delete`, in the host's, kills QEMU and removes the files (rmdir of a
directory the namespace still has a mount on detaches it there), and detaches only what a shim
that served in the host's namespace (an older version) left.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from shim.runtimes.criu import KEPT_DUMP_LOG
from shim.sys.mount import detach, mounts_under

log = logging.getLogger(__name__)

BASE_DIR = Path("/run/pyshim/kata")
VM_FILE = "kata-vm"  # in a bundle: its VM's directory
KILL_WAIT = 3.0  # QEMU ends at once on SIGKILL; `delete` has 5 s in all
# Under a container's shared directory: a checkpoint image's directory, bound from where
# containerd keeps it, while the guest writes it (checkpoint) or reads it (restore).
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_IMAGE = f"{CHECKPOINT_DIR}/image"
CHECKPOINT_LOG = f"{CHECKPOINT_DIR}/{KEPT_DUMP_LOG}"  # CRIU's log, from a failed checkpoint
LOG_LIMIT = 1 << 20


@dataclass(frozen=True)
class VmPaths:
    root: Path

    @classmethod
    def for_group(cls, namespace: str, group: str) -> VmPaths:
        # Short and fixed-length: the agent socket's path must fit sun_path.
        digest = hashlib.sha256(f"{namespace}/{group}".encode()).hexdigest()[:16]
        return cls(BASE_DIR / digest)

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def agent_socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def network_record(self) -> Path:
        """What was made in the pod's netns for the VM (shim.kata.network.Plumbing)."""
        return self.root / "network.json"

    @property
    def staging(self) -> Path:
        """Where a container's shared tree is built, out of the guest's sight."""
        return self.root / "staging"

    def container_dir(self, container_id: str) -> Path:
        return self.shared / container_id

    def staging_dir(self, container_id: str) -> Path:
        return self.staging / container_id

    def checkpoint_staging_dir(self, container_id: str) -> Path:
        return self.staging / f"{container_id}@checkpoint"  # "@" is in no container id


def record_vm(bundle: str, paths: VmPaths) -> None:
    Path(bundle, VM_FILE).write_text(str(paths.root))


def recorded_vm(bundle: str) -> VmPaths | None:
    """The VM directory recorded in the bundle; only one of ours (it is removed whole)."""
    try:
        root = Path(Path(bundle, VM_FILE).read_text().strip())
    except OSError:
        return None
    return VmPaths(root) if root.parent == BASE_DIR else None


def unshare_container(paths: VmPaths, container_id: str) -> None:
    """Detach the container's shared mounts (QEMU may hold files in them until the guest lets
    go) and remove its shared directory."""
    _remove_unmounted(paths.container_dir(container_id))
    _remove_unmounted(paths.staging_dir(container_id))  # a share that failed half-way


def unshare_checkpoint(paths: VmPaths, container_id: str) -> None:
    """Detach and remove the checkpoint image's directory a checkpoint shared."""
    _remove_unmounted(paths.container_dir(container_id) / CHECKPOINT_DIR)
    _remove_unmounted(paths.checkpoint_staging_dir(container_id))


def keep_checkpoint_log(paths: VmPaths, container_id: str, bundle: str) -> str | None:
    """The log of a failed checkpoint, which the guest wrote into the shared directory, copied
    into the bundle (read without following a symlink: the guest made it); its path, or None."""
    source = paths.container_dir(container_id) / CHECKPOINT_LOG
    target = os.path.join(bundle, KEPT_DUMP_LOG)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            content = f.read(LOG_LIMIT)
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            out.write(content)
    except OSError:
        return None
    return target


def qemu_pid(paths: VmPaths) -> int:
    """The pid in the VM's pid file if that process is still this VM's QEMU, else 0: a pid
    reused by another process is never signalled."""
    try:
        pid = int(paths.pid_file.read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return 0
    return pid if os.fsencode(paths.root) in cmdline else 0


def has_containers(paths: VmPaths) -> bool:
    try:
        return any(paths.shared.iterdir())
    except OSError:
        return False


def destroy_dead_vm(paths: VmPaths) -> None:
    """After the shim is gone: SIGKILL QEMU (not our child: polled until gone), then remove
    every mount and file of the VM."""
    pid = qemu_pid(paths)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT
        while qemu_pid(paths) and time.monotonic() < deadline:
            time.sleep(0.02)
    if paths.network_record.exists():
        from shim.kata.network import unplumb_recorded

        unplumb_recorded(paths.network_record)
    remove_vm_dir(paths)


def remove_vm_dir(paths: VmPaths) -> None:
    _remove_unmounted(paths.root)


def _remove_unmounted(directory: Path) -> None:
    """Detach every mount below ``directory``, then remove it, unless a mount stayed: rmtree
    would go through it into a container's rootfs or a host volume."""
    for point in mounts_under(str(directory)):
        with contextlib.suppress(OSError):
            detach(point)
    stayed = mounts_under(str(directory))
    if stayed:
        log.error("not removing %s: still mounted there: %s", directory, stayed)
        return
    shutil.rmtree(directory, ignore_errors=True)
