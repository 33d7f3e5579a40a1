"""A private Docker Engine on a PrivateContainerd, for the docker tests.

dockerd is Debian trixie's docker.io (Docker 26), unpacked by scripts/fetch-docker under
var/docker; nothing is installed system-wide. It gets its own data root, exec root, pidfile,
socket and daemon.json under the containerd's temp dir, uses the test's containerd (its own
namespace there), and a bridge of its own (podnet.HostBridge, on a /24 of 198.18.0.0/15) for its
default network, with no iptables, forwarding or masquerading: its containers reach each other
and the host over that bridge, nothing else. The scenarios run with `--network none`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

from harness import (
    PYKATA_RUNTIME,
    REPO,
    SYSTEM_PATH,
    HarnessError,
    PrivateContainerd,
    detach_mounts,
    file_tail,
    listening,
    mounts_under,
    remove_runtime_roots,
    stop_process,
    wait_until,
)
from podnet import HostBridge
from runsc_netns import netstack_refused_here

DOCKER_ROOT = REPO / "var" / "docker"
DOCKERD = DOCKER_ROOT / "usr" / "sbin" / "dockerd"
DOCKER = DOCKER_ROOT / "usr" / "bin" / "docker"


def docker_unusable_reason() -> str | None:
    """Why the private dockerd cannot run here, or None if it can."""
    if not DOCKERD.is_file() or not DOCKER.is_file():
        return "Docker is not unpacked; run: bash scripts/fetch-docker"
    return None


class PrivateDockerd:
    """dockerd with every path of its own under containerd.base/docker, driving containerd.

    Use as a context manager; close() removes every container and stops dockerd.
    """

    def __init__(self, containerd: PrivateContainerd, live_restore: bool = False) -> None:
        self.containerd = containerd
        self.base = containerd.base / "docker"
        self.data_root = self.base / "data"
        self.exec_root = self.base / "exec"
        self.host = f"unix://{self.base / 'docker.sock'}"
        self.log_path = self.base / "dockerd.log"
        # containerd namespace for docker's containers, apart from the ctr tests' one.
        self.namespace = f"{containerd.namespace}-docker"
        self.live_restore = live_restore
        # runsc flags for the `pyrunsc` runtime entry: its debug log, which shows that the
        # options reached the shim.
        self.runsc_config = self.base / "runsc.toml"
        self.runsc_debug_log = self.base / "runsc-debug"
        self._process: subprocess.Popen[bytes] | None = None
        self.idle_mounts: list[Path] = []
        self.bridge = HostBridge.for_session("pyshdk")

    def __enter__(self) -> PrivateDockerd:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def daemon_config(self) -> dict[str, Any]:
        return {
            "live-restore": self.live_restore,
            # The containers' cgroups, under the parent that PrivateContainerd.close() sweeps
            # for orphans.
            "cgroup-parent": f"/{self.containerd.cgroup_parent}",
            "bridge": self.bridge.name,
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "ip-masq": False,
            "userland-proxy": False,
            "storage-driver": "overlay2" if self.containerd.snapshotter == "overlayfs" else "vfs",
            "log-driver": "json-file",
            "debug": True,
            # The README's daemon.json entry for pyrunsc, with a runsc.toml of our own.
            "runtimes": {
                "pyrunsc": {
                    "runtimeType": "io.containerd.pyrunsc.v1",
                    "options": {
                        "TypeUrl": "io.containerd.runsc.v1.options",
                        "ConfigPath": str(self.runsc_config),
                    },
                },
                # pykata with the harness's pykata config (its VM assets): an entry named after
                # the runtime type, so that `--runtime io.containerd.pykata.v1` takes it (dockerd
                # looks a name up among its entries before taking it for a shim's).
                PYKATA_RUNTIME: {
                    "runtimeType": PYKATA_RUNTIME,
                    "options": {
                        "TypeUrl": "io.containerd.pykata.v1.options",
                        "ConfigPath": str(self.containerd.pykata_config),
                    },
                },
            },
        }

    def start(self) -> None:
        self.base.mkdir(exist_ok=True)
        self.bridge.create()
        (self.base / "daemon.json").write_text(json.dumps(self.daemon_config(), indent=2))
        # As the CRI harness: gVisor's netstack where it runs, else the host's in the netns.
        fallback = 'network_fallback = "host"\n' if netstack_refused_here() else ""
        self.runsc_config.write_text(
            f'{fallback}[runsc_config]\n  debug = "true"\n'
            f'  debug-log = "{self.runsc_debug_log}/%ID%/"\n'
        )
        (self.base / "cli").mkdir(exist_ok=True)
        argv = [
            str(DOCKERD),
            "--config-file", str(self.base / "daemon.json"),
            "--containerd", self.containerd.address,
            "--containerd-namespace", self.namespace,
            "--containerd-plugins-namespace", f"{self.namespace}-plugins",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.base / "docker.pid"),
            "--host", self.host,
        ]  # fmt: skip
        path = ":".join([str(DOCKER_ROOT / "usr" / "sbin"), str(DOCKER_ROOT / "usr" / "bin"),
                         SYSTEM_PATH])  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={"PATH": path, "HOME": "/root"},
                start_new_session=True,
            )
        if not wait_until(self._serving, timeout=60, interval=0.2):
            raise HarnessError(f"dockerd did not start; log tail:\n{self.log_tail()}")
        # dockerd's own, held while it runs (its data root, made a private mount).
        self.idle_mounts = mounts_under(self.base)

    def _serving(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise HarnessError(
                f"dockerd exited with {self._process.returncode}; log:\n{self.log_tail()}"
            )
        if not listening(self.base / "docker.sock"):
            return False
        return self.docker("version", check=False, timeout=10).returncode == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop dockerd (containers stop with it unless live-restore)."""
        process, self._process = self._process, None
        stop_process(process, sig, grace=60)

    def restart(self, live_restore: bool | None = None) -> None:
        if live_restore is not None:
            self.live_restore = live_restore
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            if self._process is not None and self._process.poll() is None:
                with contextlib.suppress(Exception):
                    self.remove_all()
        finally:
            self.stop()
            detach_mounts(mounts_under(self.base))
            shutil.rmtree(self.base, ignore_errors=True)
            self.bridge.remove()
            remove_runtime_roots(self.namespace)

    def remove_all(self) -> None:
        ids = self.docker("ps", "-aq", timeout=30).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, timeout=120, check=False)

    def env(self) -> dict[str, str]:
        return {
            "PATH": SYSTEM_PATH,
            "HOME": "/root",
            "DOCKER_HOST": self.host,
            "DOCKER_CONFIG": str(self.base / "cli"),
        }

    def command(self, *args: str) -> list[str]:
        return [str(DOCKER), *args]

    def docker(
        self, *args: str, timeout: float = 60, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI; with check, a failure raises with its output."""
        result = subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode:
            raise HarnessError(
                f"docker {' '.join(args)} exited with {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(*args), env=self.env(), **kwargs)

    def inspect(self, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(self.docker("inspect", name).stdout)
        return found[0]

    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)


class Terminal:
    """The docker CLI on a pty of its own, as typed at a user's terminal."""

    def __init__(self, dockerd: PrivateDockerd, *args: str, rows: int, cols: int) -> None:
        self.output = b""
        self.pid, self._master = pty.fork()
        if self.pid == 0:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            argv = dockerd.command(*args)
            os.execve(argv[0], argv, dockerd.env())

    def send(self, text: str) -> None:
        os.write(self._master, text.encode())

    def resize(self, rows: int, cols: int) -> None:
        """As a terminal window resized: the kernel sends SIGWINCH to docker."""
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def read_until(self, text: str | None, timeout: float = 30) -> bool:
        """Read until text has been printed (None: until docker closes the terminal), or
        timeout; whether it was."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text is not None and text.encode() in self.output:
                return True
            if not select.select([self._master], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # EIO: docker exited and the terminal closed
                return text is None
            if not chunk:
                return text is None
            self.output += chunk
        return False

    def wait(self, timeout: float = 30) -> int:
        """docker's exit code, once it has closed the terminal (killed after timeout)."""
        self.read_until(None, timeout)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        self.close()
        raise HarnessError(f"docker did not exit; it printed {self.output!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._master)
        if self.pid:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            self.pid = 0
