"""One QEMU virtual machine with our guest agent, as the shim daemon runs it.

The guest boots the Debian kernel with an initramfs of busybox, the 9p and virtio-serial
modules and an init script (shim.vm); it mounts the host's /usr and this package's checkout
read-only and the VM's shared directory read-write by 9p, and runs ``python -m shim.agent`` on a
virtio-serial port whose host end is a unix socket QEMU listens on. QEMU is a child of the
daemon, started through shim.sys.spawn so the one reaper learns its exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim.agent.client import AgentClient
from shim.kata import pvh
from shim.kata.config import REPO, KataConfig, VmSize
from shim.kata.guestspec import SHARED_IN_GUEST, Submount
from shim.kata.state import BASE_DIR, VmPaths, remove_vm_dir, unshare_container
from shim.runtimes.base import ShimContext
from shim.sys.mount import MountSpec, mount_rootfs, mount_table
from shim.sys.reaper import Exit
from shim.sys.spawn import fork_call, spawn
from shim.ttrpc.errors import Code, TtrpcError
from shim.vm.accel import choose_accel
from shim.vm.guest import GuestMount, GuestSetup, init_script
from shim.vm.initramfs import initramfs
from shim.vm.kernel import Kernel, find_kernel, has_module_index, write_module_index
from shim.vm.qemu import Accel, Nic, SerialPort, Share, VmConfig, command_line, kernel_append

if TYPE_CHECKING:
    from shim.kata.network import Plumbed

log = logging.getLogger(__name__)

AGENT_PORT = "agent.channel.0"
SHARED_TAG = "pyshimShared"
# 9p over virtio-pci, the agent's port, entropy for Python's start.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio_console", "virtio_rng")
NIC_MODULES = ("virtio_net",)  # with net_failover and failover, its dependencies
# Every other module of the kernel is loaded on demand by the guest kernel's modprobe helper
# (shim.vm.guest): bridge, veth, tun, overlay, nf_tables... for privileged containers, as on a
# host. The kernel's lib/modules is read where a share already shows it (the checkout's
# var/kernel): a share of its own is one more virtio-9p device to probe at each boot (under
# TCG, boot to the workload 4.4 s against 3.9 s, means of 5 boots; bound from the checkout's
# share, 3.5 s against 3.6 s: the same).
MODULES_TAG = "modules"  # that share, for a kernel_dir outside the shared directories
MODULES_IN_GUEST = "/.vm/kernel-modules"
TAP_FD = 3  # the tap's fd in QEMU
GUEST_ETC_FILES = ("ld.so.cache",)  # all the guest's programs need of the host's /etc
_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# A boot fills ~84 MB of QEMU's default cache; capped at 32 MB it is retranslated, no slower
# (boot to agent 8.4-8.6 s either way), and QEMU's PSS is 60 MB less.
TCG_CACHE_MB = 32


class VmGone(TtrpcError):
    def __init__(self) -> None:
        super().__init__(Code.UNAVAILABLE, "the VM is gone")


class Vm:
    def __init__(self, context: ShimContext, paths: VmPaths, config: KataConfig) -> None:
        self._context = context
        self.paths = paths
        self.config = config
        self.accel: Accel = "tcg"
        self.pid = 0
        self.netns = ""  # the pod's netns whose network the VM has ("": none)
        self.exited: asyncio.Future[Exit] | None = None
        self._agent: AgentClient | None = None
        self._oom_reporters: dict[str, Callable[[], None]] = {}
        self._oom_seen = 0
        self._oom_progress = asyncio.Condition()
        self._oom_task: asyncio.Task[None] | None = None
        self._modules_dir: Path | None = None  # the kernel's lib/modules, if it has its index

    @property
    def agent(self) -> AgentClient:
        if self._agent is None or self.exited is None or self.exited.done():
            raise VmGone()
        return self._agent

    async def boot(self, size: VmSize, netns: str = "") -> None:
        """Start QEMU and wait until the agent answers; on failure nothing is left running.
        With `netns`, the VM gets that netns's network (a NIC if it has an interface)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            kernel = find_kernel(Path(self.config.kernel_dir))
        except FileNotFoundError as exc:
            raise TtrpcError(Code.FAILED_PRECONDITION, str(exc)) from exc
        self.accel = await self._choose_accel(kernel)
        tap_fd = -1
        try:  # whatever fails from here on, QEMU, the tap and the VM's directory go
            # Root's only, whatever umask containerd gave us: rootfs binds and the agent's socket.
            BASE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.paths.root.mkdir(mode=0o700, exist_ok=True)
            self.paths.shared.mkdir(exist_ok=True)
            self.paths.staging.mkdir(exist_ok=True)
            plumbed = await self._plumb(netns) if netns else None
            interface = plumbed.network.interface if plumbed else None
            tap_fd = plumbed.tap_fd if plumbed else -1
            image = await self._boot_image(kernel)  # first: it says if modules can be shared
            self._write_guest_files(kernel, nic=interface is not None)
            nics = [Nic(TAP_FD, interface.mac, interface.mtu)] if interface else []
            vm_config = VmConfig(
                kernel=image,
                initrd=self.paths.initrd,
                append=kernel_append(*self.config.kernel_args),
                console_log=self.paths.console_log,
                accel=self.accel,
                memory_mb=size.memory_mb,
                vcpus=size.vcpus,
                shares=self._shares(),
                serial_ports=[SerialPort(AGENT_PORT, self.paths.agent_socket)],
                tcg_cache_mb=TCG_CACHE_MB,
                nics=nics,
            )
            log_fd = os.open(self.paths.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fds = {1: log_fd, 2: log_fd, **({TAP_FD: tap_fd} if nics else {})}
            try:
                self.pid, self.exited = spawn(
                    self._context.reaper, command_line(vm_config), fds=fds
                )
            finally:
                os.close(log_fd)
                if tap_fd >= 0:  # QEMU's now: the tap goes when QEMU does
                    tap_fd, closing = -1, tap_fd
                    os.close(closing)
            self.paths.pid_file.write_text(str(self.pid))
            started = loop.time()
            log.info(
                "VM %s: QEMU %d on %s, %s, %.2f s to prepare",
                self.paths.root.name,
                self.pid,
                self.accel,
                size,
                started - began,
            )
            self._agent = await self._connect()
            log.info(
                "VM %s: the agent answered %.2f s after QEMU started",
                self.paths.root.name,
                loop.time() - started,
            )
            if plumbed is not None and interface is not None:
                await self._configure_nic(plumbed)
        except BaseException:
            if tap_fd >= 0:
                os.close(tap_fd)
            await self.destroy()
            raise
        self._oom_task = loop.create_task(self._watch_oom())

    async def _plumb(self, netns: str) -> Plumbed:
        """The netns's network, and a tap joined to its interface (recorded first, so that
        every cleanup finds it)."""
        from shim.kata import network

        plumbing = network.Plumbing(netns)
        plumbing.write(self.paths.network_record)
        self.netns = netns
        began = time.monotonic()
        plumbing_done = asyncio.ensure_future(asyncio.to_thread(network.plumb, plumbing))
        try:
            plumbed = await asyncio.shield(plumbing_done)
        except asyncio.CancelledError:  # the thread carries on: its tap must not outlive us
            with contextlib.suppress(Exception):
                os.close((await plumbing_done).tap_fd)
            raise
        except OSError as exc:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"cannot give the VM the network of {netns}: {exc}"
            ) from exc
        interface = plumbed.network.interface
        log.info(
            "VM %s: %s in %s, %.2f s to plumb",
            self.paths.root.name,
            f"{interface.name} {interface.mac} {interface.addresses}" if interface else "no NIC",
            netns,
            time.monotonic() - began,
        )
        return plumbed

    async def _configure_nic(self, plumbed: Plumbed) -> None:
        """The guest's NIC gets the pod interface's addresses, MTU and routes."""
        from shim.kata.network import interface_request, route_requests

        interface = plumbed.network.interface
        assert interface is not None and self._agent is not None
        await self._agent.update_interface(interface_request(interface))
        await self._agent.update_routes(interface.mac, route_requests(plumbed.network.routes))

    async def _choose_accel(self, kernel: Kernel) -> Accel:
        forced = "" if self.config.accel == "auto" else self.config.accel
        if forced:
            return choose_accel(kernel, accel_cache(kernel), forced)
        # The probe boots a guest with subprocess: in a child, never in the daemon itself.
        busybox = Path(self.config.busybox)
        _, probed = fork_call(
            self._context.reaper,
            lambda: 0 if choose_accel(kernel, accel_cache(kernel), busybox=busybox) == "kvm" else 1,
            fds={},
        )
        return "kvm" if (await probed).status == 0 else "tcg"

    async def _boot_image(self, kernel: Kernel) -> Path:
        """The uncompressed kernel, else the vmlinuz. A child writes what the guest reads from
        the host and may lack: that kernel the first time (~1 s of XZ), and the bytecode of
        this checkout's modules (the guest cannot write it; compiling there costs seconds)."""
        busybox = Path(self.config.busybox)
        _, prepared = fork_call(
            self._context.reaper, lambda: _prepare_host(kernel, busybox), fds={2: 2}
        )
        await prepared
        if has_module_index(kernel):
            self._modules_dir = kernel.modules_dir.parent
        else:
            log.warning("no modules.dep for %s: the guest loads no modules", kernel.modules_dir)
        image = pvh.written(kernel)
        if image is None:
            log.warning("booting the compressed %s: ~4 s slower under TCG", kernel.vmlinuz)
            return kernel.vmlinuz
        return image

    def _write_guest_files(self, kernel: Kernel, *, nic: bool) -> None:
        self.paths.guest_etc.mkdir(exist_ok=True)
        for name in GUEST_ETC_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.paths.guest_etc / name).write_bytes(Path("/etc", name).read_bytes())
        modules = kernel.modules_in_load_order(MODULES + (NIC_MODULES if nic else ()))
        image = initramfs(
            Path(self.config.busybox).read_bytes(),
            [(m.name, m.read_bytes()) for m in modules],
            init_script(self._guest_setup([m.name for m in modules])),
        )
        self.paths.initrd.write_bytes(image)

    def _shares(self) -> list[Share]:
        shares = [Share(SHARED_TAG, self.paths.shared, readonly=False)]
        shares.append(Share("etc", self.paths.guest_etc))
        shares += [Share(f"host{i}", path) for i, path in enumerate(_host_dirs())]
        if self._modules_dir is not None and _shown_at(self._modules_dir) is None:
            shares.append(Share(MODULES_TAG, self._modules_dir))
        return shares

    def _guest_setup(self, modules: list[str]) -> GuestSetup:
        mounts = [GuestMount(SHARED_TAG, SHARED_IN_GUEST, readonly=False)]
        mounts.append(GuestMount("etc", "/etc"))
        mounts += [GuestMount(f"host{i}", str(path)) for i, path in enumerate(_host_dirs())]
        modules_tree = None
        if self._modules_dir is not None:
            modules_tree = _shown_at(self._modules_dir)
            if modules_tree is None:
                mounts.append(GuestMount(MODULES_TAG, MODULES_IN_GUEST))
                modules_tree = MODULES_IN_GUEST
        symlinks = [(f"/{n}", os.readlink(f"/{n}")) for n in _TOP_LEVEL if os.path.islink(f"/{n}")]
        agent = [sys.executable, "-m", "shim.agent", "--device", "$port"]
        if self._context.debug:
            agent.append("--debug")
        find_port = (
            "for p in /sys/class/virtio-ports/*; do"
            f' [ "$(cat $p/name)" = {AGENT_PORT} ] && port=/dev/${{p##*/}}; done'
        )
        command = f"{find_port}; cd {shlex.quote(str(REPO))} && {' '.join(agent)}"
        return GuestSetup(
            modules=modules,
            mounts=mounts,
            command=command,
            modules_tree=modules_tree,
            symlinks=symlinks,
            environment=[("PYTHONDONTWRITEBYTECODE", "1")],  # the checkout is read-only
        )

    async def _connect(self) -> AgentClient:
        assert self.exited is not None
        connecting = asyncio.ensure_future(
            AgentClient.connect(str(self.paths.agent_socket), timeout=self.config.boot_timeout)
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
        problem = self.paths.qemu_log.read_text(errors="replace").strip()[-500:]
        raise TtrpcError(Code.UNKNOWN, f"QEMU exited while booting: {problem}")

    # -- containers' files ---------------------------------------------------------------------

    def share(
        self, container_id: str, rootfs: str, binds: Mapping[str, tuple[str, bool]]
    ) -> dict[str, list[Submount]]:
        """Bind the rootfs and each bind source (name under the container's dir -> host path,
        recursive) into the shared directory; the host mounts that came along below each
        recursive one. The tree is built where the guest cannot see it, then moved
        in whole: in the (writable) shared directory, a guest could swap a directory for a
        symlink between two of our steps and have a host path mounted over."""
        directory = self.paths.staging_dir(container_id)
        submounts: dict[str, list[Submount]] = {}
        try:
            (directory / "rootfs").mkdir(parents=True)
            _bind(rootfs, directory / "rootfs")
            for name, (source, recursive) in binds.items():
                target = directory / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if os.path.isdir(source):
                    target.mkdir()
                else:
                    target.touch()
                _bind(source, target, recursive=recursive)
                if recursive:
                    submounts[name] = _submounts(target)
            # Fails (ENOTEMPTY, ENOTDIR, EEXIST) if the guest put anything at that name.
            os.rename(directory, self.paths.container_dir(container_id))
        except OSError as exc:
            unshare_container(self.paths, container_id)
            raise TtrpcError(
                Code.UNKNOWN, f"cannot share {container_id} with the VM: {exc}"
            ) from exc
        return submounts

    # -- OOM events ----------------------------------------------------------------------------

    def report_oom(self, container_id: str, report: Callable[[], None]) -> None:
        self._oom_reporters[container_id] = report

    def forget(self, container_id: str) -> None:
        self._oom_reporters.pop(container_id, None)

    async def _watch_oom(self) -> None:
        try:
            while True:
                event = await self.agent.wait_oom(self._oom_seen)
                reporter = self._oom_reporters.get(event.container_id)
                if reporter is not None:
                    reporter()
                async with self._oom_progress:
                    self._oom_seen = event.sequence
                    self._oom_progress.notify_all()
        except TtrpcError as exc:  # the VM is gone: nothing more will come
            log.debug("OOM watch ends: %s", exc)
        finally:
            async with self._oom_progress:
                self._oom_task = None
                self._oom_progress.notify_all()

    async def oom_reported(self, sequence: int) -> None:
        """Until every OOM event up to `sequence` was reported (or none can be any more)."""
        async with self._oom_progress:
            await self._oom_progress.wait_for(
                lambda: self._oom_seen >= sequence or self._oom_task is None
            )

    # -- the end ---------------------------------------------------------------------------

    async def destroy(self) -> None:
        """SIGKILL QEMU (the guest holds nothing worth a clean shutdown once its containers are
        removed) and remove the VM's files."""
        if self.exited is not None and not self.exited.done():
            os.kill(self.pid, signal.SIGKILL)  # our child until reaped: never a reused pid
        if self.exited is not None:
            await self.exited
        if self._oom_task is not None:
            self._oom_task.cancel()
        if self._agent is not None:
            await self._agent.close()
        await self._unplumb()
        remove_vm_dir(self.paths)

    async def _unplumb(self) -> None:
        """The tap (gone with QEMU, unless QEMU never got it) and the qdiscs in the netns."""
        if self.paths.network_record.exists():
            from shim.kata.network import unplumb_recorded

            await asyncio.to_thread(unplumb_recorded, self.paths.network_record)


def _prepare_host(kernel: Kernel, busybox: Path) -> int:
    import compileall

    compileall.compile_dir(REPO / "shim", quiet=2)  # only what is stale: ~20 ms
    if not has_module_index(kernel):
        try:
            write_module_index(kernel, busybox)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"cannot write {kernel.modules_dir}/modules.dep: {exc}", file=sys.stderr)
    if pvh.written(kernel) is None:
        pvh.write(kernel)
    return 0


def accel_cache(kernel: Kernel) -> Path:
    """The probe's answer for this kernel, on tmpfs (probed again after a reboot). One file per
    kernel: checkouts with kernels of their own would otherwise overwrite each other's answer,
    and each container's boot would wait out a 20 s KVM probe."""
    digest = hashlib.sha256(os.fsencode(kernel.vmlinuz.resolve())).hexdigest()[:16]
    return BASE_DIR / f"accel-{digest}.json"


def _host_dirs() -> list[Path]:
    """What the guest shares read-only: /usr (Python, runc), the checkout of this package, and
    the top-level directories of a host whose / is not merged into /usr."""
    dirs = [Path("/usr"), REPO]
    return dirs + [
        Path("/", n) for n in _TOP_LEVEL if not os.path.islink(f"/{n}") and os.path.isdir(f"/{n}")
    ]


def _shown_at(path: Path) -> str | None:
    """Where a read-only host share shows `path` in the guest (at its own path), if one does."""
    resolved = path.resolve()
    for shared in _host_dirs():
        if resolved.is_relative_to(shared.resolve()):
            return str(shared / resolved.relative_to(shared.resolve()))
    return None


def _bind(source: str, target: Path, *, recursive: bool = True) -> None:
    """As the spec binds it: runc's plain bind leaves the mounts below the source out."""
    option = "rbind" if recursive else "bind"
    mount_rootfs([MountSpec("bind", source, "", (option,))], str(target))


def _submounts(target: Path) -> list[Submount]:
    """The mounts strictly below `target`, shallowest first, with their read-only state."""
    prefix = str(target) + "/"
    found = [
        Submount(point[len(prefix) :], "ro" in options)
        for point, options in mount_table()
        if point.startswith(prefix)
    ]
    # A path mounted twice: the later (upper) one is what the guest sees there.
    unique = {submount.path: submount for submount in found}
    return sorted(unique.values(), key=lambda s: s.path.count("/"))
