"""How a VM's QEMU starts: booted cold, or restored from a template.

The guest is Debian's kernel, an initramfs of busybox, the boot's modules and the init script
(shim.vm), and the guest image (shim.vm.image) on a read-only virtio-blk disk as its /usr; the
agent runs from that image on a virtio-serial port whose host end is a unix socket QEMU listens
on. No host directory is shared at boot: the pod's shared directory is mounted by the agent
when the host calls SetupGuest.

A template is the first VM of a machine (kernel, initrd, image, size, accelerator, QEMU),
booted until the agent has opened its port and then saved by QEMU's migration: its RAM stays
in a file of its own (x-ignore-shared: the migration stream holds the devices only), which
clones map privately, copy-on-write. A clone skips the kernel's boot and the agent's start;
its command line has the template's devices in the template's order, so that the saved state
fits. No host connects to a template's agent: the guest does not always learn that a host left
before the state is saved (seen: not in 14 s), and every clone's first call would then land
in the template's ttrpc connection ("StreamID cannot be re-used").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.agent.client import AgentClient
from shim.kata.config import VmSize
from shim.sys.reaper import Exit, Reaper
from shim.sys.spawn import spawn
from shim.ttrpc.errors import Code, TtrpcError
from shim.vm.guest import GuestSetup, init_script
from shim.vm.initramfs import initramfs
from shim.vm.kernel import Kernel
from shim.vm.qemu import (
    QEMU_BINARY,
    Accel,
    Memory,
    Nic,
    SerialPort,
    Share,
    VmConfig,
    command_line,
)
from shim.vm.qmp import Qmp, QmpError
from shim.vm.templates import Template, TemplateStore, template_key

log = logging.getLogger(__name__)

# Bump when the device set or the guest's setup changes: a template of another layout would
# not fit a clone's command line.
LAYOUT = 2  # 2: saved before any host connects to the agent
AGENT_PORT = "agent.channel.0"
SHARED_TAG = "pyshimShared"
USR_DEVICE = "/dev/vda"  # the image: the only disk
TAP_FD = 3  # the tap's fd in QEMU
# virtio over PCI; the image's disk and file system; 9p for the shared directory; the agent's
# port; entropy (Python's start blocks without it); the NIC every VM has. Every other module is
# in the image, loaded on demand by the kernel's /sbin/modprobe. crc32c_generic first: erofs's
# libcrc32c names it only as a soft dependency, which the load order does not follow.
BOOT_MODULES = (
    "virtio_pci", "virtio_blk", "crc32c_generic", "erofs", "9pnet_virtio", "9p",
    "virtio_console", "virtio_rng", "virtio_net",
)  # fmt: skip
USR_LINKS = (
    ("/bin", "usr/bin"),
    ("/sbin", "usr/sbin"),
    ("/lib", "usr/lib"),
    ("/lib64", "usr/lib64"),
)
GUEST_TMPFS = ("/etc", "/tmp", "/run", "/var/tmp", "/var/lib", "/root")
AGENT_PATH = "/usr/lib/pyshim"  # the image's PYTHONPATH root
# TCG's translation cache: a cold boot fills ~84 MB of QEMU's default; a clone runs far less
# code. QEMU's PSS with 3 pods: 95 MB at 32, 85 at 24, 76 at 16; ctr run --rm true took
# 2.5-3.3 s at each size (medians of 3, run to run noise larger than any difference): 24 keeps
# room over 16 for a busier guest.
TCG_CACHE_MB = 24
SAVE_POLL = 0.05
PORT_POLL = 0.05
QMP_TIMEOUT = 10.0
# Every VM has a NIC (a template's clones all need one) with this MAC until SetupGuest gives it
# the pod's, or takes it away from a VM without a pod network.
PLACEHOLDER_MAC = "02:00:00:00:00:01"


@dataclass(frozen=True)
class RunFiles:
    """Where one QEMU's sockets, logs and shared directory are."""

    directory: Path
    shared: Path

    @property
    def agent_socket(self) -> Path:
        return self.directory / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"


@dataclass(frozen=True)
class Machine:
    """What a VM is made of: all that a template and its clones have alike."""

    kernel: Path  # the booted kernel image (PVH ELF or vmlinuz)
    initrd: bytes
    image: Path
    image_key: str
    append: str
    size: VmSize
    accel: Accel

    @functools.cached_property
    def template_key(self) -> str:
        """Hashes the initrd and stats the kernel and QEMU: once per VM."""
        return template_key(
            layout=LAYOUT,
            kernel=_file_identity(self.kernel),
            initrd=hashlib.sha256(self.initrd).hexdigest(),
            image=self.image_key,
            append=self.append,
            vcpus=self.size.vcpus,
            memory_mb=self.size.memory_mb,
            accel=self.accel,
            qemu=qemu_identity(),
        )

    def config(
        self,
        files: RunFiles,
        initrd: Path,
        nic: Nic,
        *,
        memory: Memory | None = None,
        incoming: bool = False,
    ) -> VmConfig:
        return VmConfig(
            kernel=self.kernel,
            initrd=initrd,
            append=self.append,
            console_log=files.console_log,
            accel=self.accel,
            memory_mb=self.size.memory_mb,
            vcpus=self.size.vcpus,
            shares=[Share(SHARED_TAG, files.shared, readonly=False)],
            serial_ports=[SerialPort(AGENT_PORT, files.agent_socket)],
            tcg_cache_mb=TCG_CACHE_MB,
            nics=[nic],
            disks=[self.image],
            memory=memory,
            qmp_socket=files.qmp_socket,
            incoming=incoming,
        )


def guest_initrd(kernel: Kernel, busybox: Path, runtime: str) -> bytes:
    """The initramfs whose init runs the agent with `runtime`, an OCI runtime in the image."""
    modules = kernel.modules_in_load_order(BOOT_MODULES)
    setup = GuestSetup(
        modules=[m.name for m in modules],
        mounts=[],
        command=_agent_command(runtime),
        symlinks=USR_LINKS,
        tmpfs=GUEST_TMPFS,
        environment=[("PYTHONPATH", AGENT_PATH), ("PYTHONDONTWRITEBYTECODE", "1")],
        usr_device=USR_DEVICE,
    )
    return initramfs(
        busybox.read_bytes(), [(m.name, m.read_bytes()) for m in modules], init_script(setup)
    )


def _agent_command(runtime: str) -> str:
    find_port = (
        "for p in /sys/class/virtio-ports/*; do"
        f' [ "$(cat $p/name)" = {AGENT_PORT} ] && port=/dev/${{p##*/}}; done'
    )
    # -S: no site; the image holds no site-packages, only AGENT_PATH.
    agent = f"/usr/bin/python3 -S -m shim.agent --runtime /usr/sbin/{shlex.quote(runtime)}"
    return f"{find_port}; exec {agent} --device $port"


class Qemu:
    """One QEMU process, a child of the daemon through the one reaper."""

    def __init__(self, pid: int, exited: asyncio.Future[Exit], files: RunFiles) -> None:
        self.pid = pid
        self.exited = exited
        self.files = files

    @classmethod
    def start(cls, reaper: Reaper, config: VmConfig, files: RunFiles, tap_fd: int = -1) -> Qemu:
        log_fd = os.open(files.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fds = {1: log_fd, 2: log_fd, **({TAP_FD: tap_fd} if tap_fd >= 0 else {})}
        try:
            pid, exited = spawn(reaper, command_line(config), fds=fds)
        finally:
            os.close(log_fd)
        return cls(pid, exited, files)

    async def kill(self) -> None:
        if not self.exited.done():
            os.kill(self.pid, signal.SIGKILL)  # our child until reaped: never a reused pid
        await self.exited

    async def agent(self, timeout: float) -> AgentClient:
        """The agent's client once it answers; a TtrpcError if QEMU exits first or the agent
        does not answer in time."""
        connecting = asyncio.ensure_future(
            AgentClient.connect(str(self.files.agent_socket), timeout=timeout)
        )
        racing: list[asyncio.Future[Any]] = [connecting, self.exited]
        try:
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        finally:  # cancelled (the boot abandoned) or QEMU exited: no connect left behind
            connecting.cancel()
        if connecting in done:
            try:
                return connecting.result()
            except TimeoutError as exc:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"VM did not boot: {exc}") from exc
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        raise self._exited_while_booting()

    async def port_opened(self, qmp: Qmp, name: str, timeout: float) -> None:
        """Once the guest has opened the virtio-serial port `name` (the agent listens on it);
        a TtrpcError if QEMU exits first or the port stays closed `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chardevs = await qmp.execute("query-chardev")
                    if any(c["label"] == name and c["frontend-open"] for c in chardevs):
                        return
                    await asyncio.sleep(PORT_POLL)
        except TimeoutError:
            late = f"the guest did not open port {name} within {timeout} s"
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"VM did not boot: {late}") from None
        except QmpError as exc:
            with contextlib.suppress(TimeoutError):  # its control socket closed: it is exiting
                async with asyncio.timeout(QMP_TIMEOUT):
                    await asyncio.shield(self.exited)
            if self.exited.done():
                raise self._exited_while_booting() from exc
            raise TtrpcError(Code.UNKNOWN, f"QEMU's control socket: {exc}") from exc

    def _exited_while_booting(self) -> TtrpcError:
        problem = self.files.qemu_log.read_text(errors="replace").strip()[-500:]
        return TtrpcError(Code.UNKNOWN, f"QEMU exited while booting: {problem}")

    async def qmp(self) -> Qmp:
        try:
            return await Qmp.connect(self.files.qmp_socket, QMP_TIMEOUT)
        except (TimeoutError, OSError, QmpError) as exc:
            raise TtrpcError(Code.UNKNOWN, f"QEMU's control socket: {exc}") from exc


async def restore(qemu: Qemu, template: Template) -> None:
    """Load the template's state into a QEMU started with `incoming`; it runs on once loaded
    (or exits if the state does not fit)."""
    qmp = await qemu.qmp()
    try:
        await qmp.execute("migrate-set-capabilities", _IGNORE_SHARED)
        await qmp.execute(
            "migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(template.state))}"}
        )
    except QmpError as exc:
        raise TtrpcError(Code.UNKNOWN, f"restoring template {template.key}: {exc}") from exc
    finally:
        await qmp.close()


async def make_template(
    store: TemplateStore,
    machine: Machine,
    reaper: Reaper,
    run_directory: Path,
    boot_timeout: float,
    started: Callable[[int], None],
) -> Template | None:
    """Boot the machine's template and save it, unless another shim is making it (None).
    `started` learns the template QEMU's pid (a `delete` after a killed shim must find it)."""
    key = machine.template_key
    began = time.monotonic()
    with store.creating(key) as work:
        if work is None:
            log.info("template %s: another shim is making it; booting cold", key)
            return None
        run_directory.mkdir(mode=0o700, exist_ok=True)
        files = RunFiles(run_directory, run_directory / "shared")
        files.shared.mkdir(exist_ok=True)
        initrd = work / "initrd"
        initrd.write_bytes(machine.initrd)
        config = machine.config(
            files, initrd, Nic(None, PLACEHOLDER_MAC), memory=Memory(work / "memory", shared=True)
        )
        qemu = Qemu.start(reaper, config, files)
        started(qemu.pid)
        try:
            qmp = await qemu.qmp()
            try:
                await qemu.port_opened(qmp, AGENT_PORT, boot_timeout)
                booted = time.monotonic()
                await _save(qmp, work / "state")
            finally:
                await qmp.close()
        finally:
            await qemu.kill()
            shutil.rmtree(run_directory, ignore_errors=True)
        info = {
            "key": key,
            "created": time.time(),
            "vcpus": machine.size.vcpus,
            "memory_mb": machine.size.memory_mb,
            "accel": machine.accel,
            "kernel": str(machine.kernel),
            "image": machine.image_key,
            "qemu": qemu_identity(),
        }
        (work / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info(
            "template %s: booted in %.2f s, saved in %.2f s",
            key,
            booted - began,
            time.monotonic() - booted,
        )
    return store.get(key)


async def _save(qmp: Qmp, state: Path) -> None:
    try:
        await qmp.execute("migrate-set-capabilities", _IGNORE_SHARED)
        await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
        while True:
            status = (await qmp.execute("query-migrate")).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise TtrpcError(Code.UNKNOWN, f"saving the template: migration {status}")
            await asyncio.sleep(SAVE_POLL)
    except QmpError as exc:
        raise TtrpcError(Code.UNKNOWN, f"saving the template: {exc}") from exc
    finally:
        await qmp.close()


_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


def qemu_identity() -> str:
    binary = shutil.which(QEMU_BINARY)
    return _file_identity(Path(binary)) if binary else "none"


def _file_identity(path: Path) -> str:
    """A file's identity without reading it: a replaced package changes its size or mtime."""
    info = path.stat()
    return f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}"
