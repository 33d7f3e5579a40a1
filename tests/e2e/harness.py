"""A private containerd for the e2e tests and the demo.

Everything it starts lives under one temp dir (config, root, state, sockets, FIFOs, log) and
is stopped by pid; it never touches a system containerd. Standard library only, so that
scripts/demo can import it without pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

from podnet import CNI_BIN_DIR, PodNetwork
from product import ASSETS_DIR, PRODUCT_BIN, ProductError, product_install, pykata_toml
from runsc_netns import netstack_refused_here

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
IMAGE_TAR = REPO / "var" / "images" / "busybox.tar"
PAUSE_TAR = REPO / "var" / "images" / "pause.tar"
CRI_NAMESPACE = "k8s.io"  # the only namespace containerd's CRI plugin uses
PYRUNC_RUNTIME = "io.containerd.pyrunc.v1"
PYKATA_RUNTIME = "io.containerd.pykata.v1"
PYKATA_SHIM = "containerd-shim-pykata-v1"
GO_RUNTIME = "io.containerd.runc.v2"  # containerd's own Go shim, the reference
# On containerd 2.x, a CRI handler of runtime_type GO_RUNTIME whose runtime_path is pyrunc's
# shim: 2.x introspects a handler's features (recursive read-only mounts) for that type only.
RUNC_TYPED_PYRUNC = "pyrunc-runc-typed"
DEFAULT_VERSION = os.environ.get("PYSHIM_CONTAINERD", "1.6")  # the containerd to test against
# Per test run: runc keeps its state by namespace and id under one root for every containerd,
# so two runs on one machine must not share a namespace.
NAMESPACE = f"pyshim-e2e-{os.getpid()}"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# ctr subcommands that create a container, given --runtime-config-path for pykata's config.
CREATE_SUBCOMMANDS = [("run",)] + [
    (containers, "create") for containers in ("c", "container", "containers")
]
# ctr subcommands that create FIFOs and accept --fifo-dir.
FIFO_SUBCOMMANDS = [("run",)] + [
    (tasks, action) for tasks in ("t", "task", "tasks") for action in ("start", "exec")
]
# The task events of PrivateContainerd.exec_then_kill_events, in the order containerd's shims
# publish them.
EXEC_THEN_KILL_TOPICS = [
    "/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
    "/tasks/exit", "/tasks/exit", "/tasks/delete",
]  # fmt: skip
# A ContainerDelete event (field 1 = id) used as a marker in the event stream.
MARKER_TYPE_URL = b"containerd.events.ContainerDelete"
MARKER_TOPIC = "/pyshim/marker"
MNT_DETACH = 2
SHIM_SOCKET_DIR = Path("/run/containerd/s")  # shim.relay.SOCKET_DIR (harness: stdlib only)
TEMPLATE_COMM = "pyshim-template"  # shim.template.TEMPLATE_COMM (harness: stdlib only)


class HarnessError(Exception):
    """The private containerd could not be set up or did not behave."""


class CtrError(subprocess.CalledProcessError):
    """A ctr command failed; the message carries its output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


@dataclass(frozen=True)
class Binaries:
    containerd: Path
    ctr: Path


def binaries(version: str) -> Binaries:
    """containerd and ctr for PYSHIM_CONTAINERD: 1.6 is Debian's, others from fetch-containerd."""
    if version == "1.6":
        return Binaries(Path("/usr/bin/containerd"), Path("/usr/bin/ctr"))
    unpacked = REPO / "var" / f"containerd-{version}" / "usr" / "bin"
    found = Binaries(unpacked / "containerd", unpacked / "ctr")
    if not found.containerd.is_file():
        raise HarnessError(
            f"containerd {version} is not unpacked; run: bash scripts/fetch-containerd {version}"
        )
    return found


def unusable_reason() -> str | None:
    """Why a private containerd cannot run containers here, or None if it can."""
    if os.geteuid() != 0:
        return "e2e tests need root"
    cgroup = Path("/sys/fs/cgroup")
    unified = (cgroup / "cgroup.controllers").is_file()
    hierarchy = cgroup if unified else cgroup / "memory"
    if not hierarchy.is_dir() or not os.access(hierarchy, os.W_OK):
        return f"{hierarchy} is not a writable cgroup hierarchy"
    return None


def image_ref(image_tar: Path) -> str:
    """The org.opencontainers.image.ref.name that scripts/build-image put in the index."""
    with tarfile.open(image_tar) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise HarnessError(f"{image_tar} has no index.json")
        index = json.load(member)
    ref: str = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    return ref


def ensure_image(pause: bool = False) -> Path:
    """The busybox image tar (or with pause, the CRI pod sandbox image), built if missing."""
    tar = PAUSE_TAR if pause else IMAGE_TAR
    if not tar.is_file():
        build = [str(REPO / "scripts" / "build-image"), *(["--pause"] if pause else []), str(tar)]
        run(build, timeout=180)
    return tar


def run(argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=check, stdin=subprocess.DEVNULL
    )


def overlay_works(scratch: Path) -> bool:
    """Probe a two-lower overlay mount, as the overlayfs snapshotter needs."""
    dirs = {name: scratch / name for name in ("lower1", "lower2", "upper", "work", "merged")}
    for path in dirs.values():
        path.mkdir(parents=True)
    lower = f"{dirs['lower1']}:{dirs['lower2']}"
    options = f"lowerdir={lower},upperdir={dirs['upper']},workdir={dirs['work']}"
    mounted = run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(dirs["merged"])],
        timeout=10,
        check=False,
    )
    if mounted.returncode == 0:
        run(["umount", str(dirs["merged"])], timeout=10)
    shutil.rmtree(scratch)
    return mounted.returncode == 0


def listening(path: Path) -> bool:
    """Whether a server accepts on the unix socket at path."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def cgroup_hierarchies() -> list[Path]:
    """The cgroup v2 root, or each v1 controller's hierarchy (and the v1 root's tmpfs)."""
    root = Path("/sys/fs/cgroup")
    return [root] + [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]


def shim_bin_dir(base: Path, pykata_bin: Path = PRODUCT_BIN) -> Path:
    """A dir of links to every containerd-shim-py* console script of the editable venv, but
    pykata's, which runs as users install it: from pykata_bin (var/product by default, made by
    product.product_install(), which vm_support.require_vm runs before any VM)."""
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for script in sorted(VENV_BIN.glob("containerd-shim-py*")):
        target = pykata_bin / script.name if script.name == PYKATA_SHIM else script
        (bin_dir / script.name).symlink_to(target)
    return bin_dir


def mounts_under(prefix: Path, pid: int | None = None) -> list[Path]:
    """Mount points below prefix, deepest last as listed in mountinfo: ours, or those of the
    mount namespace of process `pid` (pykata's shim has one of its own; none if it is gone)."""
    found = []
    try:
        mountinfo = Path(f"/proc/{pid or 'self'}/mountinfo").read_text()
    except OSError:  # gone
        return []
    for line in mountinfo.splitlines():
        # Field 5 is the mount point, with spaces etc. octal-escaped.
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]))
        if point.is_relative_to(prefix):
            found.append(point)
    return found


def mounts_in_any_namespace(prefix: Path) -> list[str]:
    """Mount points below prefix in every mount namespace on the machine (pykata's shims have
    their own, which a leaked QEMU keeps), each with a pid of its namespace but ours."""
    ours = os.readlink("/proc/self/ns/mnt")
    members: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                members.setdefault(os.readlink(entry / "ns" / "mnt"), int(entry.name))
    found = [str(point) for point in mounts_under(prefix)]
    for namespace, pid in members.items():
        if namespace != ours:
            found += [f"{point} (mount namespace of {pid})" for point in mounts_under(prefix, pid)]
    return found


def detach_mounts(points: list[Path]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for point in reversed(points):
        libc.umount2(str(point).encode(), MNT_DETACH)


def process_args(pid: int) -> tuple[list[str], list[str]]:
    """argv and environment of a process ([] if it is gone)."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return [], []
    return [a.decode(errors="replace") for a in argv], [e.decode(errors="replace") for e in env]


def child_pids(parents: Sequence[int]) -> list[int]:
    """The processes whose parent is one of `parents`."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # comm, in parentheses, may hold spaces: the fields after its last ')' are state, ppid
        if int(stat.rpartition(")")[2].split()[1]) in parents:
            children.append(int(entry.name))
    return children


def process_comm(pid: int) -> str:
    """The process name (/proc/PID/comm), "" if it is gone."""
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def stop_process(process: subprocess.Popen[bytes] | None, sig: int, grace: float) -> None:
    """Send a daemon we started sig and reap it; SIGKILL if it outlives grace seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def file_tail(path: Path, lines: int) -> str:
    """The last lines of a daemon's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class EventLog:
    """Lines printed by `ctr events`, filled by a reader thread; harness markers kept apart."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._markers: list[str] = []
        self._changed = threading.Condition()

    def record(self, line: str) -> None:
        with self._changed:
            (self._markers if event_topic(line) == MARKER_TOPIC else self.lines).append(line)
            self._changed.notify_all()

    def clear(self) -> None:
        with self._changed:
            self.lines.clear()

    def topics(self) -> list[str]:
        """The topic of each line, in order (e.g. "/tasks/exit")."""
        with self._changed:
            return [event_topic(line) for line in self.lines]

    def task_topics(self) -> list[str]:
        """The topics of the task events (/tasks/...), in order."""
        return [topic for topic in self.topics() if topic.startswith("/tasks/")]

    def lines_of(self, topic: str) -> list[str]:
        with self._changed:
            return [line for line in self.lines if event_topic(line) == topic]

    def wait_for(self, *texts: str, timeout: float = 10) -> str:
        """The first line containing all texts; HarnessError if none arrives in time."""
        return self._wait(self.lines, texts, timeout)

    def wait_for_marker(self, marker: str, timeout: float) -> None:
        self._wait(self._markers, (marker,), timeout)

    def _wait(self, lines: list[str], texts: tuple[str, ...], timeout: float) -> str:
        def matches(line: str) -> bool:
            return all(text in line for text in texts)

        with self._changed:
            if not self._changed.wait_for(lambda: any(map(matches, lines)), timeout):
                raise HarnessError(f"no event containing {texts} in {timeout}s: {self.lines}")
            return next(filter(matches, lines))


def record_lines(stream: IO[str], log: EventLog) -> None:
    for line in stream:
        log.record(line.rstrip("\n"))


def protobuf_field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (short values only: one-byte length)."""
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


def event_topic(line: str) -> str:
    """`ctr events` prints: <timestamp (4 words)> <namespace> <topic> <json>."""
    words = line.split(" ", 6)
    return words[5] if len(words) > 5 and words[5].startswith("/") else ""


class Task(NamedTuple):
    """A row of `ctr tasks ls`."""

    pid: int
    status: str


def remove_runtime_roots(namespace: str) -> None:
    """runc's and runsc's state roots for a containerd namespace outlive its containers; each is
    removed once empty (rmdir keeps one that is not, so a leak stays visible)."""
    for parent in (Path("/run/containerd/runc"), Path("/run/containerd/runsc")):
        with contextlib.suppress(OSError):
            (parent / namespace).rmdir()


class PrivateContainerd:
    """A containerd with its own config, root, state and sockets under a fresh temp dir.

    Use as a context manager (or start()/close()); close() stops everything it started.
    pykata is the shim of pykata_bin (default: the product install, see shim_bin_dir) with its
    VM assets in vm_assets, named by the pykata config (pykata_config) that ctr's pykata
    containers (ctr_command), the CRI handler and dockerd's runtime entry all get.
    """

    def __init__(
        self,
        version: str = "1.6",
        runtime: str = PYRUNC_RUNTIME,
        namespace: str = NAMESPACE,
        env: Mapping[str, str] | None = None,
        cri: bool = False,
        pykata_bin: Path = PRODUCT_BIN,
        vm_assets: Path = ASSETS_DIR,
    ) -> None:
        self.version = version
        self.runtime = runtime
        # With cri, the CRI plugin serves on the gRPC socket, with the handlers `pyshim
        # install` registers, and the tests work in its namespace.
        self.cri = cri
        self.namespace = CRI_NAMESPACE if cri else namespace
        # CRI pods get cgroups under this parent (ctr containers: under the namespace).
        self.cgroup_parent = f"pyshim-cri-{os.getpid()}" if cri else self.namespace
        self.binaries = binaries(version)
        self.image = image_ref(ensure_image())
        self.base = Path(tempfile.mkdtemp(prefix="pyshim-ctrd-"))
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.address = str(self.base / "containerd.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.fifo_dir = self.base / "fifo"
        self.log_path = self.base / "containerd.log"
        self.pykata_bin = pykata_bin
        self.vm_assets = vm_assets
        self.pykata_config = self.base / "pykata.toml"
        self.registry_hosts = self.base / "certs.d"  # CRI's registry config_path
        self.snapshotter = "overlayfs" if overlay_works(self.base / "overlay-probe") else "native"
        # With cri, pods that do not use the host's network get one of their own on this bridge.
        self.pod_network = PodNetwork.for_session(self.base) if cri else None
        self._ip_forward = ""
        self._extra_env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateContainerd:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Write the config, start containerd, and import the busybox image."""
        self.fifo_dir.mkdir(exist_ok=True)
        shim_bin_dir(self.base, self.pykata_bin)
        self.pykata_config.write_text(pykata_toml(self.vm_assets))
        (self.base / "config.toml").write_text(self._config_toml())
        if self.cri:
            self._install_handlers()
        if self.pod_network is not None:
            self._ip_forward = self.pod_network.install(self.base / "cni-conf")
        self._launch()
        self.ctr("images", "import", str(IMAGE_TAR), timeout=120)
        if self.cri:
            self.ctr("images", "import", str(ensure_image(pause=True)), timeout=120)

    @property
    def config_version(self) -> int:
        """The containerd config file syntax: 2 for containerd 1.x, 3 for 2.x."""
        return 2 if self.version.startswith("1.") else 3

    def _config_toml(self) -> str:
        # NRI would open a socket under /var/run/nri; CRI, when not tested, slows start-up.
        disabled = ["io.containerd.nri.v1.nri"]
        extra = ""
        if not self.cri:
            disabled.append("io.containerd.grpc.v1.cri")
            if self.config_version == 3:
                disabled += ["io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]
        if self.config_version == 3:
            # 2.x unpacks imported images through the transfer service.
            extra = (
                '[plugins."io.containerd.transfer.v1.local"]\n'
                f'  unpack_config = [{{platform = "linux", snapshotter = "{self.snapshotter}"}}]\n'
            )
        if self.cri:
            extra += self._cri_config_toml()
        quoted = ", ".join(f'"{name}"' for name in disabled)
        imports = f'imports = ["{self.base / "conf.d"}/*.toml"]\n' if self.cri else ""
        return (
            f"version = {self.config_version}\n" + imports + f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            f"disabled_plugins = [{quoted}]\n"
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.ttrpc_address}"\n'
            '[debug]\n  level = "debug"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.base / "opt"}"\n' + extra
        )

    def _install_handlers(self) -> None:
        """`pyshim install`, as an administrator runs it, on this containerd's private paths.
        Its links go to a dir of their own: containerd runs the shims of shim_bin_dir's (where
        pykata's is the product's, which install would refuse to replace). The VM's assets are
        product_install()'s, when a test needs them (--no-vm-assets)."""
        argv = [str(VENV_BIN / "pyshim"), "install", "--containerd", str(self.binaries.containerd)]
        argv += ["--config", str(self.base / "config.toml")]
        argv += ["--drop-in-dir", str(self.base / "conf.d")]
        argv += ["--bin-dir", str(self.base / "install-bin")]
        argv += ["--runsc-config", str(self.base / "runsc.toml")]
        argv += ["--pykata-config", str(self.pykata_config), "--assets-dir", str(self.vm_assets)]
        argv += ["--no-vm-assets"]
        installed = run(argv, timeout=60, check=False)
        if installed.returncode:
            raise HarnessError(f"pyshim install failed:\n{installed.stdout}{installed.stderr}")
        if netstack_refused_here():
            # This runsc refuses every CNI pod's netns here (gVisor issue 10704): the choice
            # the starter runsc.toml documents, made as an administrator would make it.
            # tests/cri/test_failed_pods.py checks the default's error.
            runsc_config = self.base / "runsc.toml"
            runsc_config.write_text('network_fallback = "host"\n' + runsc_config.read_text())

    def _cri_config_toml(self) -> str:
        """CRI: the offline pause image, the session's CNI pod network (podnet.py), the
        streaming server on loopback, and containerd's own runc shim as the reference handler
        `runc` (on 2.x also RUNC_TYPED_PYRUNC). Registries: a hosts.toml per host in
        registry_hosts (read at each pull; none by default). Root here lacks CAP_SYS_RESOURCE,
        so no oom_score_adj may go below containerd's own (CRI gives pause -998 otherwise, and
        runc init dies)."""
        pause = image_ref(ensure_image(pause=True))
        registry = f'  config_path = "{self.registry_hosts}"\n'
        cni = f'  bin_dir = "{CNI_BIN_DIR}"\n  conf_dir = "{self.base / "cni-conf"}"\n'
        server = '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
        oom = "  restrict_oom_score_adj = true\n"
        if self.config_version == 2:
            cri = '[plugins."io.containerd.grpc.v1.cri"'
            return (
                f'{cri}]\n  sandbox_image = "{pause}"\n{server}{oom}'
                f"{cri}.cni]\n{cni}"
                f"{cri}.registry]\n{registry}"
                f'{cri}.containerd]\n  snapshotter = "{self.snapshotter}"\n'
                '  default_runtime_name = "runc"\n'
                f'{cri}.containerd.runtimes.runc]\n  runtime_type = "{GO_RUNTIME}"\n'
            )
        images, runtime = (
            "[plugins.'io.containerd.cri.v1.images'",
            "[plugins.'io.containerd.cri.v1.runtime'",
        )
        return (
            f'{images}]\n  snapshotter = "{self.snapshotter}"\n'
            f'{images}.pinned_images]\n  sandbox = "{pause}"\n'
            f"{images}.registry]\n{registry}"
            f"{runtime}]\n{oom}"
            f"{runtime}.cni]\n{cni}"
            f'{runtime}.containerd]\n  default_runtime_name = "runc"\n'
            f'{runtime}.containerd.runtimes.runc]\n  runtime_type = "{GO_RUNTIME}"\n'
            f"{runtime}.containerd.runtimes.{RUNC_TYPED_PYRUNC}]\n"
            f'  runtime_type = "{GO_RUNTIME}"\n'
            f'  runtime_path = "{self.base / "bin" / "containerd-shim-pyrunc-v1"}"\n'
            f"[plugins.'io.containerd.grpc.v1.cri']\n{server}"
        )

    def _launch(self) -> None:
        # Our shims first, then the Go shim matching this containerd, then the system's.
        path = [str(self.base / "bin"), str(self.binaries.containerd.parent), SYSTEM_PATH]
        env = {"PATH": ":".join(dict.fromkeys(path)), "HOME": "/root", **self._extra_env}
        # containerd unpacks a checkpoint to restore into a ctrd-checkpoint* dir there and never
        # removes it (1.6's services/tasks/local.go): keep those inside our temp dir.
        env.setdefault("XDG_RUNTIME_DIR", str(self.base))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(self.binaries.containerd), "--config", str(self.base / "config.toml")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                # Its cwd is the first place it looks for shim binaries (PROTOCOL A.1).
                cwd=self.base,
                start_new_session=True,
            )
        if not wait_until(self._serving, timeout=30, interval=0.1):
            raise HarnessError(f"containerd did not start; log tail:\n{self.log_tail()}")

    def _serving(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise HarnessError(
                f"containerd exited with {self._process.returncode}; log:\n{self.log_tail()}"
            )
        if not listening(Path(self.address)):
            return False
        return self.ctr("version", check=False, timeout=10).returncode == 0

    def restart(self, sig: int = signal.SIGTERM, down_for: float = 0) -> None:
        """Stop containerd with sig (SIGKILL for a crash), wait down_for seconds (shims keep
        running), and start it again on the same dirs."""
        self._stop_daemon(sig)
        time.sleep(down_for)
        self._launch()

    def _stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        process, self._process = self._process, None
        stop_process(process, sig, grace=20)

    def close(self) -> None:
        """Remove tasks and containers, stop containerd and our shims, clean the temp dir."""
        stayed: list[int] = []
        try:
            if self._process is not None and self._process.poll() is None:
                with contextlib.suppress(Exception):
                    self.remove_all()
        finally:
            self._stop_daemon()
            for pid in self.shim_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # A template exits by itself once its containerd is gone, and removes its socket;
            # a killed one would leave the socket file in /run/containerd/s.
            wait_until(lambda: not self.shim_pids(include_templates=True), timeout=5)
            stayed = self.shim_pids(include_templates=True)
            for pid in stayed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            orphans = self._kill_container_processes()
            self._remove_dead_shim_sockets()
            detach_mounts(mounts_under(self.base))
            if self.pod_network is not None:
                self.pod_network.remove(self._ip_forward)
            shutil.rmtree(self.base, ignore_errors=True)
            self._remove_namespace_dirs()
        problems = [f"shim templates {stayed} outlived their containerd"] if stayed else []
        if orphans:
            problems.append(f"container processes {orphans} outlived their shims")
        if problems:
            raise RuntimeError("; ".join(problems) + " (killed)")

    def _remove_dead_shim_sockets(self) -> None:
        """The socket files of the shims we killed (a SIGKILL leaves them in
        /run/containerd/s), found through the bundles' address files."""
        for address in self.state.glob("io.containerd.runtime.v2.task/*/*/address"):
            with contextlib.suppress(OSError):
                path = Path(address.read_text().strip().removeprefix("unix://"))
                if path.parent == SHIM_SOCKET_DIR and not listening(path):
                    path.unlink()

    def _kill_container_processes(self) -> list[int]:
        """Processes left in our containers' cgroups once every shim is gone (the orphans of a
        shim that crashed or was killed): killed, and returned so that the leak is reported."""
        found = set()
        for hierarchy in cgroup_hierarchies():
            for procs in (hierarchy / self.cgroup_parent).glob("**/cgroup.procs"):
                with contextlib.suppress(OSError):
                    found.update(int(pid) for pid in procs.read_text().split())
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in found), timeout=10)
        return sorted(found)

    def _remove_namespace_dirs(self) -> None:
        """runc/runsc state roots and the cgroup parents named after our namespace outlive
        their containers; they are empty once every container is gone (rmdir keeps any
        that are not, so a leak stays visible)."""
        remove_runtime_roots(self.namespace)
        for hierarchy in cgroup_hierarchies():
            ours = hierarchy / self.cgroup_parent
            # Deepest first: a killed container's own cgroup (runc never deleted it) is empty.
            for directory in sorted(ours.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    # -- ctr -------------------------------------------------------------------------------

    def ctr_command(self, *args: str) -> list[str]:
        """argv for ctr against this containerd; FIFOs of run/task start/exec go to fifo_dir, and
        a pykata container gets this containerd's pykata config unless args name one."""
        args_list = list(args)
        for subcommand in CREATE_SUBCOMMANDS:
            n = len(subcommand)
            if tuple(args_list[:n]) == subcommand and self._is_pykata(args_list[n:]):
                args_list[n:n] = ["--runtime-config-path", str(self.pykata_config)]
        for subcommand in FIFO_SUBCOMMANDS:
            n = len(subcommand)
            if tuple(args_list[:n]) == subcommand and not {"--log-uri", "--fifo-dir"} & {
                a.split("=")[0] for a in args_list
            }:
                args_list[n:n] = ["--fifo-dir", str(self.fifo_dir)]
        return [
            str(self.binaries.ctr),
            "--address",
            self.address,
            "--namespace",
            self.namespace,
            *args_list,
        ]

    @staticmethod
    def _is_pykata(args: list[str]) -> bool:
        """Whether ctr's create flags choose pykata without naming a runtime config."""
        flags = [arg.split("=")[0] for arg in args]
        if "--runtime-config-path" in flags:
            return False
        pairs = itertools.pairwise(args)
        return f"--runtime={PYKATA_RUNTIME}" in args or ("--runtime", PYKATA_RUNTIME) in pairs

    @property
    def ctr_env(self) -> dict[str, str]:
        return {"PATH": SYSTEM_PATH, "CONTAINERD_SNAPSHOTTER": self.snapshotter}

    def ctr(
        self, *args: str, input: str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr; CtrError (with its output) if check and it exits non-zero."""
        result = subprocess.run(
            self.ctr_command(*args),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.ctr_env,
        )
        if check and result.returncode != 0:
            raise CtrError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def start_ctr(
        self,
        *args: str,
        stdin: int = subprocess.DEVNULL,
        stdout: int = subprocess.DEVNULL,
        stderr: int = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """ctr in the background, for commands a caller must act on while they run."""
        return subprocess.Popen(
            self.ctr_command(*args), stdin=stdin, stdout=stdout, stderr=stderr, env=self.ctr_env
        )

    def exec_then_kill_events(
        self,
        name: str,
        init: Sequence[str],
        exec_: Sequence[str],
        *,
        runtime: str | None = None,
        image: str | None = None,
        stop_timeout: float = 10,
    ) -> EventLog:
        """The events of one task's life: run `name` detached with `init`, exec `exec_` as
        "ev-x", SIGKILL the task and delete it (EXEC_THEN_KILL_TOPICS, when all goes well)."""
        with self.events() as events:
            self.run_detached(name, *init, runtime=runtime, image=image)
            self.ctr("tasks", "exec", "--exec-id", "ev-x", name, *exec_, check=False)
            self.ctr("tasks", "kill", "--signal", "SIGKILL", name)
            if not wait_until(lambda: self.task_status(name) == "STOPPED", timeout=stop_timeout):
                raise HarnessError(f"task {name} did not stop: {self.task_status(name)}")
            self.ctr("tasks", "delete", name)
            events.wait_for("/tasks/delete")
        return events

    def feed_stdin(self, name: str, *args: str, data: bytes) -> tuple[int, bytes, bytes]:
        """Run ctr with `args`, which starts task `name`, and write `data` to its stdin once
        the task runs: ctr 1.6 never closes a stdin that hit EOF before the task existed
        (PROTOCOL Q0). Returns ctr's exit code, stdout and stderr."""
        ctr = self.start_ctr(*args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            if not wait_until(lambda: self.task_status(name) == "RUNNING", timeout=20):
                raise HarnessError(f"task {name} is not running: {self.task_status(name)}")
            out, err = ctr.communicate(data, timeout=30)
        finally:
            ctr.kill()
            ctr.wait(timeout=10)
        return ctr.returncode, out, err

    def ctr_in_terminal(
        self, *args: str, rows: int = 37, cols: int = 113, timeout: float = 60
    ) -> tuple[int, bytes]:
        """ctr on a fresh pty of rows x cols, as from a user's terminal: its exit code and
        everything it printed (a pty turns \\n into \\r\\n)."""
        pid, master = pty.fork()
        if pid == 0:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            argv = self.ctr_command(*args)
            os.execve(argv[0], argv, self.ctr_env)
        output = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not select.select([master], [], [], 1)[0]:
                    continue
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: ctr exited and the terminal closed
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(master)
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), output

    def stop_exec(self, ctr: subprocess.Popen[bytes], container_id: str, exec_id: str) -> None:
        """End an exec through the shim, so its ctr exits and removes its FIFOs itself."""
        kill = ("tasks", "kill", "--exec-id", exec_id, "--signal", "SIGKILL", container_id)
        self.ctr(*kill, check=False)
        try:
            ctr.wait(timeout=20)
        finally:
            ctr.kill()
            ctr.wait(timeout=10)

    # -- tasks and containers --------------------------------------------------------------

    def run_detached(
        self, name: str, *command: str, runtime: str | None = None, image: str | None = None
    ) -> None:
        """`ctr run -d` of a container (runtime and image default to this containerd's)."""
        runtime = runtime or self.runtime
        self.ctr("run", "-d", "--runtime", runtime, image or self.image, name, *command)

    def tasks(self, timeout: float = 60) -> dict[str, Task]:
        """task id -> pid and status, from `ctr tasks ls`."""
        rows = [
            line.split()
            for line in self.ctr("tasks", "ls", timeout=timeout).stdout.splitlines()[1:]
        ]
        return {row[0]: Task(int(row[1]), row[2]) for row in rows}

    def task_status(self, container_id: str) -> str:
        """RUNNING, STOPPED, PAUSED, ... or "absent" if there is no such task."""
        task = self.tasks().get(container_id)
        return task.status if task else "absent"

    def task_pid(self, container_id: str) -> int:
        task = self.tasks().get(container_id)
        if task is None:
            raise HarnessError(f"no task {container_id}")
        return task.pid

    def kill_and_delete(self, name: str, check: bool = True) -> None:
        """SIGKILL a task, then delete it and its container; with check, HarnessError if the
        task does not stop (without, for clean-up paths that must not mask an error)."""
        self.ctr("tasks", "kill", "--signal", "SIGKILL", name, check=False)
        stopped = wait_until(lambda: self.task_status(name) in ("STOPPED", "absent"), timeout=20)
        if check and not stopped:
            raise HarnessError(f"task {name} did not stop: {self.task_status(name)}")
        self.ctr("tasks", "delete", name, check=False)
        self.ctr("containers", "delete", name, check=False)

    def exec_output(self, name: str, *command: str) -> str:
        """stdout of a command exec'd in a running task (a fresh exec id each time)."""
        exec_id = f"x{time.monotonic_ns()}"
        return self.ctr("tasks", "exec", "--exec-id", exec_id, name, *command).stdout

    def settle(self) -> None:
        """Wait (up to 20 s) for the shims of deleted tasks to exit."""
        wait_until(lambda: not self.shim_pids(), timeout=20, interval=0.1)

    @property
    def pid(self) -> int:
        """containerd's pid (it runs the binary directly, no wrapper)."""
        assert self._process is not None, "containerd is not running"
        return self._process.pid

    def bundle(self, container_id: str) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / self.namespace / container_id

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)

    # -- events ----------------------------------------------------------------------------

    def publish_marker(self, marker: str) -> None:
        """Publish a ContainerDelete{id=marker} on MARKER_TOPIC through `containerd publish`."""
        any_message = protobuf_field(1, MARKER_TYPE_URL) + protobuf_field(
            2, protobuf_field(1, marker.encode())
        )
        argv = [str(self.binaries.containerd), "--address", self.address, "publish"]
        argv += ["--namespace", self.namespace, "--topic", MARKER_TOPIC]
        subprocess.run(argv, input=any_message, capture_output=True, timeout=30, check=True)

    @contextlib.contextmanager
    def events(self, timeout: float = 30) -> Iterator[EventLog]:
        """Record `ctr events` while the block runs.

        A marker event before the block proves the subscription is live, and one after it
        proves every event published before the block ended has been printed. containerd 2.x
        publishes some events (/tasks/delete) after the call that causes them has returned:
        wait_for those inside the block.
        """
        log = EventLog()
        process = subprocess.Popen(
            self.ctr_command("events"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.ctr_env,
        )
        assert process.stdout is not None
        reader = threading.Thread(target=record_lines, args=(process.stdout, log), daemon=True)
        reader.start()
        try:
            # Until ctr events has subscribed, a marker is lost: publish until one shows up.
            deadline = time.monotonic() + timeout
            for attempt in itertools.count():
                self.publish_marker(f"pyshim-begin-{attempt}")
                try:
                    log.wait_for_marker("pyshim-begin-", timeout=0.5)
                    break
                except HarnessError:
                    if time.monotonic() > deadline:
                        raise
            log.clear()
            yield log
            self.publish_marker("pyshim-end")
            log.wait_for_marker("pyshim-end", timeout=timeout)
        finally:
            process.kill()
            process.wait(timeout=10)
            reader.join(timeout=10)

    # -- cleanup ---------------------------------------------------------------------------

    def remove_all(self) -> None:
        """Kill and delete every task, then delete every container of our namespace."""
        for task_id, (_pid, status) in self.tasks(timeout=30).items():
            if status == "PAUSED":
                self.ctr("tasks", "resume", task_id, timeout=30, check=False)
            self.ctr("tasks", "delete", "--force", task_id, timeout=30, check=False)
        containers = self.ctr("containers", "ls", "-q", timeout=30).stdout.split()
        if containers:
            self.ctr("containers", "delete", *containers, timeout=60, check=False)

    def shim_pids(self, include_templates: bool = False) -> list[int]:
        """Shim processes of this containerd: a containerd-shim-* program whose argv or
        environment names our address (the Python shims run as `python <script>`). The
        template that forks Python shims (shim.template) counts only with include_templates."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            argv, env = process_args(int(entry.name))
            # argv[:3]: `python <console script>`, and the launcher's fallback
            # `python pyshim-shim <shim>` (a daemon it forked shows that until it renames)
            if not any(Path(a).name.startswith("containerd-shim-") for a in argv[:3]):
                continue
            if not include_templates and process_comm(int(entry.name)) == TEMPLATE_COMM:
                continue
            if self.address in argv or f"TTRPC_ADDRESS={self.ttrpc_address}" in env:
                pids.append(int(entry.name))
        return pids

    def leftovers(self) -> list[str]:
        """What a finished test left behind: shim processes, mounts, FIFO dirs. Not a template:
        it stays for its idle time (close() checks that it goes with containerd)."""
        problems = [f"shim process {pid}: {process_args(pid)[0]}" for pid in self.shim_pids()]
        problems += [f"mount {point}" for point in mounts_in_any_namespace(self.base)]
        problems += [f"FIFO dir {entry}" for entry in sorted(self.fifo_dir.iterdir())]
        if self.pod_network is not None:
            problems += self.pod_network.leftovers()
        return problems

    def force_clean(self) -> None:
        """Kill our shims and detach mounts, so a broken test does not break the next."""
        shims = self.shim_pids(include_templates=True)
        # With them their children: a SIGKILLed shim leaves them running (a VM's QEMU, too).
        for pid in shims + child_pids(shims):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self.shim_pids(include_templates=True), timeout=5)
        self._remove_dead_shim_sockets()
        detach_mounts(mounts_under(self.base))
        for entry in self.fifo_dir.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
        if self.pod_network is not None:
            self.pod_network.force_clean()


# -- demo (scripts/demo) ---------------------------------------------------------------------


def demo(runtime: str, version: str) -> int:
    """Walk through a container's lifecycle with ctr, printing each command and state."""
    reason = unusable_reason()
    if reason:
        print(f"demo: cannot run containers here: {reason}", file=sys.stderr)
        return 1
    if runtime == PYKATA_RUNTIME:
        product_install()  # pykata runs from var/product, on var/vm-assets
    with PrivateContainerd(version=version, runtime=runtime, namespace="pyshim-demo") as ctrd:
        print(f"# private containerd {version} at {ctrd.address} (log: {ctrd.log_path})")

        def step(title: str, *args: str, expect: int = 0) -> None:
            print(f"\n## {title}\n$ ctr {shlex.join(args)}")
            result = ctrd.ctr(*args, check=False)
            print((result.stdout + result.stderr).rstrip() or "(no output)")
            if result.returncode:
                print(f"(exit code {result.returncode})")
            if result.returncode != expect:
                raise HarnessError(f"ctr {shlex.join(args)} exited {result.returncode}")

        init = ["sleep", "100000"]
        create_args = ["--runtime", runtime, ctrd.image, "demo", *init]
        step("container: metadata only", "containers", "create", *create_args)
        step("no task yet", "tasks", "ls")
        with ctrd.events() as events:
            step("start the task (shim creates and starts it)", "tasks", "start", "-d", "demo")
            step("task state", "tasks", "ls")
            script = "echo hello from an exec; echo to stderr >&2; exit 5"
            exec_args = ["--exec-id", "hello", "demo", "sh", "-c", script]
            step("exec a process (exit code 5)", "tasks", "exec", *exec_args, expect=5)
            step("pause", "tasks", "pause", "demo")
            step("task state", "tasks", "ls")
            step("resume", "tasks", "resume", "demo")
            step("task state", "tasks", "ls")
            step("kill the init with SIGKILL", "tasks", "kill", "--signal", "SIGKILL", "demo")
            exit_event = events.wait_for("/tasks/exit", '"id":"demo"', timeout=30)
            step("task state", "tasks", "ls")
            step("delete the task", "tasks", "delete", "demo")
        print(f"\n## exit event\n{exit_event}")
        step("delete the container", "containers", "delete", "demo")
        print("\n## events seen\n" + "\n".join(events.topics()))
    print("\n# containerd stopped, temp dir removed")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="pyshim demo on a private containerd")
    parser.add_argument("--runtime", default=PYRUNC_RUNTIME)
    parser.add_argument("--containerd", default=DEFAULT_VERSION)
    options = parser.parse_args()
    try:
        sys.exit(demo(options.runtime, options.containerd))
    except (HarnessError, ProductError) as error:
        print(f"demo: {error}", file=sys.stderr)
        sys.exit(1)
