"""One QEMU virtual machine with our guest agent, as the shim daemon runs it.

shim.kata.boot starts QEMU (restored from a template, or booted cold); here the VM gets the
pod's network and what makes it itself (SetupGuest), and the containers' files are shared with
it. QEMU is a child of the daemon, started through shim.sys.spawn so the one reaper learns its
exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from shim.agent.client import AgentClient
from shim.api.agent.v1 import agent_pb2 as api
from shim.kata import pvh
from shim.kata.boot import (
    PLACEHOLDER_MAC,
    SHARED_TAG,
    TAP_FD,
    Machine,
    Qemu,
    RunFiles,
    guest_initrd,
    make_template,
    restore,
)
from shim.kata.config import KataConfig, VmSize
from shim.kata.guestspec import SHARED_IN_GUEST, container_dir_in_guest
from shim.kata.state import (
    BASE_DIR,
    CHECKPOINT_DIR,
    CHECKPOINT_IMAGE,
    VmPaths,
    remove_vm_dir,
    unshare_checkpoint,
    unshare_container,
)
from shim.runtimes.base import ShimContext
from shim.sys.mount import (
    MountSpec,
    Submount,
    attach_tree,
    clone_tree,
    mount_rootfs,
    submounts_of,
)
from shim.sys.namespaces import in_host_mounts
from shim.sys.reaper import Exit
from shim.sys.spawn import fork_call
from shim.ttrpc.errors import Code, TtrpcError
from shim.vm.accel import choose_accel
from shim.vm.assets import SETUP_COMMAND
from shim.vm.image import GuestImage, current_image
from shim.vm.kernel import Kernel, find_kernel
from shim.vm.qemu import Accel, Memory, Nic, kernel_append
from shim.vm.templates import Template, TemplateStore

if TYPE_CHECKING:
    from shim.kata.network import Plumbed

log = logging.getLogger(__name__)


class VmGone(TtrpcError):
    def __init__(self) -> None:
        super().__init__(Code.UNAVAILABLE, "the VM is gone")


class Vm:
    def __init__(self, context: ShimContext, paths: VmPaths, config: KataConfig) -> None:
        self._context = context
        self.paths = paths
        self.config = config
        self.accel: Accel = "tcg"
        self.netns = ""  # the pod's netns whose network the VM has ("": none)
        self.qemu: Qemu | None = None
        self._agent: AgentClient | None = None
        self._oom_reporters: dict[str, Callable[[], None]] = {}
        self._oom_seen = 0
        self._oom_progress = asyncio.Condition()
        self._oom_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.qemu.pid if self.qemu else 0

    @property
    def exited(self) -> asyncio.Future[Exit] | None:
        return self.qemu.exited if self.qemu else None

    @property
    def agent(self) -> AgentClient:
        if self._agent is None or self.qemu is None or self.qemu.exited.done():
            raise VmGone()
        return self._agent

    async def boot(self, size: VmSize, netns: str = "") -> None:
        """Start QEMU and wait until the agent answers; on failure nothing is left running.
        With `netns`, the VM gets that netns's network (a NIC if it has an interface)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        kernel, image = self._assets()
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
            tap_fd = plumbed.tap_fd if plumbed and interface else -1
            machine = Machine(
                kernel=_boot_image(kernel),
                initrd=guest_initrd(kernel, Path(self.config.busybox), self.config.guest_runtime),
                image=image.path,
                image_key=image.key,
                append=kernel_append(*self.config.kernel_args),
                size=size,
                accel=self.accel,
            )
            mac = interface.mac if interface else ""
            nic = Nic(TAP_FD, mac) if interface else Nic(None, PLACEHOLDER_MAC)
            files = RunFiles(self.paths.root, self.paths.shared)
            prepared = loop.time()
            how = "restored"
            agent = await self._start_clone(machine, files, nic, tap_fd)
            if agent is None:
                how = "booted"
                agent = await self._start_cold(machine, files, nic, tap_fd)
            self._agent = agent
            await agent.setup_guest(self._guest_identity(mac))
            log.info(
                "VM %s: QEMU %d on %s, %s, %s: %.2f s to prepare, %.2f s to the agent",
                self.paths.root.name,
                self.qemu.pid if self.qemu else 0,
                self.accel,
                size,
                how,
                prepared - began,
                loop.time() - prepared,
            )
            if plumbed is not None and interface is not None:
                await self._configure_nic(plumbed)
        except BaseException:
            await self.destroy()
            raise
        finally:
            if tap_fd >= 0:  # QEMU has its own: the tap goes when QEMU does
                os.close(tap_fd)
        self._oom_task = loop.create_task(self._watch_oom())

    def _assets(self) -> tuple[Kernel, GuestImage]:
        """The kernel and the guest image, or an error that names the command making them."""
        try:
            kernel = find_kernel(self.config.kernel_root())
        except FileNotFoundError as exc:
            raise TtrpcError(Code.FAILED_PRECONDITION, str(exc)) from exc
        images = self.config.assets().images_dir
        image = current_image(images)
        if image is None:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"no guest image in {images}: run `{SETUP_COMMAND}`"
            )
        if image.release != kernel.release:
            raise TtrpcError(
                Code.FAILED_PRECONDITION,
                f"the guest image {image.key} holds the modules of {image.release}, the kernel"
                f" is {kernel.release}: run `{SETUP_COMMAND}`",
            )
        runtime = self.config.guest_runtime
        if runtime not in image.runtimes:
            raise TtrpcError(
                Code.FAILED_PRECONDITION,
                f"the guest image {image.key} has no {runtime} ([vm] guest_runtime): apt-get"
                f" install {runtime}, then run `{SETUP_COMMAND}`",
            )
        return kernel, image

    async def _start_clone(
        self, machine: Machine, files: RunFiles, nic: Nic, tap_fd: int
    ) -> AgentClient | None:
        """The agent of a VM restored from the machine's template (made first if need be), or
        None where there is none or it failed: the caller boots cold."""
        if not self.config.templates:
            return None
        store = TemplateStore(self.config.assets().templates_dir)
        template: Template | None = store.get(machine.template_key)
        try:
            if template is None:
                template = await make_template(
                    store,
                    machine,
                    self._context.reaper,
                    self.paths.root / "template",
                    self.config.boot_timeout,
                    started=self._record_pid,
                )
                if template is None:
                    return None
            config = machine.config(
                files,
                template.directory / "initrd",
                nic,
                memory=Memory(template.memory, shared=False),
                incoming=True,
            )
            self._start_qemu(Qemu.start(self._context.reaper, config, files, tap_fd))
            assert self.qemu is not None
            await restore(self.qemu, template)
            return await self.qemu.agent(self.config.boot_timeout)
        except TtrpcError as exc:
            log.warning(
                "VM %s: template %s: %s; booting cold",
                self.paths.root.name,
                template.key if template else machine.template_key,
                exc.message,
            )
            await self._stop_qemu()
            return None

    async def _start_cold(
        self, machine: Machine, files: RunFiles, nic: Nic, tap_fd: int
    ) -> AgentClient:
        self.paths.initrd.write_bytes(machine.initrd)
        config = machine.config(files, self.paths.initrd, nic)
        self._start_qemu(Qemu.start(self._context.reaper, config, files, tap_fd))
        assert self.qemu is not None
        return await self.qemu.agent(self.config.boot_timeout)

    def _start_qemu(self, qemu: Qemu) -> None:
        self.qemu = qemu
        self._record_pid(qemu.pid)

    def _record_pid(self, pid: int) -> None:
        self.paths.pid_file.write_text(str(pid))

    async def _stop_qemu(self) -> None:
        if self.qemu is not None:
            await self.qemu.kill()
            self.qemu = None
        self.paths.pid_file.unlink(missing_ok=True)

    def _guest_identity(self, mac: str) -> api.SetupGuestRequest:
        now = Timestamp()
        now.GetCurrentTime()
        return api.SetupGuestRequest(
            random_seed=secrets.token_bytes(64),
            machine_id=secrets.token_hex(16),
            hostname=f"pykata-{self.paths.root.name}",
            time=now,
            shared_tag=SHARED_TAG,
            shared_path=SHARED_IN_GUEST,
            debug=self._context.debug,
            nic_mac=mac,
        )

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

    # -- containers' files ---------------------------------------------------------------------

    def share(
        self, container_id: str, rootfs: str, binds: Mapping[str, tuple[str, bool]]
    ) -> dict[str, list[Submount]]:
        """Bind the rootfs and each bind source (name under the container's dir -> host path,
        recursive) into the shared directory; the host mounts that came along below each
        recursive one. The tree is built where the guest cannot see it, then moved
        in whole: in the (writable) shared directory, a guest could swap a directory for a
        symlink between two of our steps and have a host path mounted over.
        The rootfs is ours (the shim mounted it, or the client did before the shim started);
        the bind sources are bound as the host sees them now."""
        directory = self.paths.staging_dir(container_id)
        submounts: dict[str, list[Submount]] = {}
        try:
            (directory / "rootfs").mkdir(parents=True)
            mount_rootfs([MountSpec("bind", rootfs, "", ("rbind",))], str(directory / "rootfs"))
            for name, (source, recursive) in binds.items():
                target = directory / name
                target.parent.mkdir(parents=True, exist_ok=True)
                _bind_host_path(source, target, recursive=recursive)
                if recursive:
                    submounts[name] = submounts_of(str(target))
            # Fails (ENOTEMPTY, ENOTDIR, EEXIST) if the guest put anything at that name.
            os.rename(directory, self.paths.container_dir(container_id))
        except OSError as exc:
            unshare_container(self.paths, container_id)
            raise TtrpcError(
                Code.UNKNOWN, f"cannot share {container_id} with the VM: {exc}"
            ) from exc
        return submounts

    def share_checkpoint(self, container_id: str, image_dir: str) -> str:
        """Bind `image_dir` (where a checkpoint's image is to go) into the container's shared
        directory, built out of the guest's sight and moved in whole as in `share`; its path
        in the guest. unshare_checkpoint undoes it."""
        staging = self.paths.checkpoint_staging_dir(container_id)
        image = staging / Path(CHECKPOINT_IMAGE).relative_to(CHECKPOINT_DIR)
        try:
            staging.mkdir()
            _bind_host_path(image_dir, image, recursive=False)
            os.rename(staging, self.paths.container_dir(container_id) / CHECKPOINT_DIR)
        except OSError as exc:
            unshare_checkpoint(self.paths, container_id)
            raise TtrpcError(Code.UNKNOWN, f"cannot share {image_dir} with the VM: {exc}") from exc
        return f"{container_dir_in_guest(container_id)}/{CHECKPOINT_IMAGE}"

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
        if self.qemu is not None:
            await self.qemu.kill()
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


def _boot_image(kernel: Kernel) -> Path:
    """The uncompressed kernel `pyshim assets` wrote, else the vmlinuz."""
    image = pvh.written(kernel)
    if image is None:
        log.warning("booting the compressed %s: ~4 s slower under TCG", kernel.vmlinuz)
        return kernel.vmlinuz
    return image


def accel_cache(kernel: Kernel) -> Path:
    """The probe's answer for this kernel, on tmpfs (probed again after a reboot). One file per
    kernel: checkouts with kernels of their own would otherwise overwrite each other's answer,
    and each container's boot would wait out a 20 s KVM probe."""
    digest = hashlib.sha256(os.fsencode(kernel.vmlinuz.resolve())).hexdigest()[:16]
    return BASE_DIR / f"accel-{digest}.json"


def _bind_host_path(source: str, target: Path, *, recursive: bool) -> None:
    """Bind `source` as the host's mount namespace has it (the shim has its own, see
    KataRuntime) onto `target`, made a directory or a file as the source is; as the spec binds
    it: runc's plain bind leaves the mounts below the source out."""
    tree = in_host_mounts(lambda: clone_tree(source, recursive=recursive))
    try:
        if stat.S_ISDIR(os.fstat(tree).st_mode):
            target.mkdir()
        else:
            target.touch()
        attach_tree(tree, str(target))
    finally:
        os.close(tree)
