"""The VM backend: each container runs in a QEMU virtual machine with its own kernel, driven
through our guest agent (shim.agent; its API is proto/pyshim/agent/v1).

One VM per shim daemon: under ``ctr`` one per container, under CRI one per pod (the pod's
shim is grouped by sandbox id; the pause container boots the VM, the app containers join it).
Each container's rootfs and bind-mount sources are bound into the VM's shared directory, which
the guest mounts by 9p; the agent runs the container under runc in the guest.

What containerd sees: every process's pid is QEMU's (a guest pid would name an unrelated host
process); stdio is relayed between the Task service's pipes (or a local pty) and the agent by
stream offset; a process's exit comes from WaitProcess once its output is drained and the OOM
events before it are published (TaskOOM before TaskExit); QEMU dying ends every process with
255. The VM is removed with its last container; after a killed shim, ``delete`` does it from
what the bundle records (shim.kata.state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shim.kata.config import KataConfig, vm_size
from shim.kata.guestspec import (
    container_dir_in_guest,
    guest_process,
    guest_spec,
    shared_bind_name,
)
from shim.kata.network import HostNetworkRefused, vm_netns
from shim.kata.relay import ProcessRelay
from shim.kata.state import (
    CHECKPOINT_IMAGE,
    CHECKPOINT_LOG,
    VmPaths,
    destroy_dead_vm,
    has_containers,
    keep_checkpoint_log,
    record_vm,
    recorded_vm,
    unshare_checkpoint,
    unshare_container,
)
from shim.kata.vm import Vm, VmGone
from shim.runtimes import oci
from shim.runtimes.base import (
    INIT_PID_FILE,
    CheckpointRequest,
    Container,
    ContainerConfig,
    Launched,
    ProcessStdio,
    Runtime,
    ShimContext,
    recorded_init_pid,
)
from shim.runtimes.cri import SANDBOX_ID, annotation
from shim.runtimes.spec import is_bind, is_recursive
from shim.sys.mount import unmount_all
from shim.sys.reaper import Exit
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

OUTPUT_DRAIN_TIMEOUT = 5.0  # after the exit, for the last output to come over virtio-serial
VM_GONE_STATUS = 255


class KataRuntime(Runtime):
    # The shared directory's binds (and the rootfs the shim mounts) out of the host's mount
    # namespace: the host can remove a volume's directory with a mount below it while the pod
    # runs (rmdir of a mount point is EBUSY only in the namespace that has the mount).
    private_mounts = True

    def __init__(self, context: ShimContext) -> None:
        super().__init__(context)
        self._vm: Vm | None = None
        self._booting = asyncio.Lock()
        self._members: set[str] = set()
        self.guest_pids: dict[str, int] = {}  # container id -> its init's pid in the guest

    def container(self, config: ContainerConfig) -> Container:
        return KataContainer(self, config)

    async def join(self, config: ContainerConfig, spec: Mapping[str, Any]) -> Vm:
        """The VM of this shim, booted for the first container (sized by its spec)."""
        async with self._booting:
            self._members.add(config.id)
            if self._vm is None:
                from shim.manager import grouping_id

                group = grouping_id(config.bundle, config.id)
                try:
                    netns = vm_netns(spec)
                except HostNetworkRefused as exc:
                    raise TtrpcError(Code.FAILED_PRECONDITION, str(exc)) from None
                vm = Vm(
                    self.context,
                    VmPaths.for_group(self.context.namespace, group),
                    KataConfig.from_options(config.options),
                )
                await vm.boot(vm_size(vm.config, spec), netns)
                self._vm = vm
            return self._vm

    def is_last(self, container_id: str) -> bool:
        return self._members == {container_id}

    async def leave(self, container_id: str) -> None:
        """The container is removed: the VM goes with the last one."""
        self._members.discard(container_id)
        self.guest_pids.pop(container_id, None)
        async with self._booting:
            if not self._members and self._vm is not None:
                vm, self._vm = self._vm, None
                await vm.destroy()

    @classmethod
    def preload(cls) -> None:
        from shim.kata.network import import_pyroute2

        import_pyroute2()

    @classmethod
    def cleanup(cls, namespace: str, bundle: str, container_id: str) -> int:
        paths = recorded_vm(bundle)
        if paths is not None:
            unshare_container(paths, container_id)
            if not has_containers(paths):
                destroy_dead_vm(paths)
        unmount_all(os.path.join(bundle, "rootfs"))
        return recorded_init_pid(bundle)


class KataContainer(Container):
    def __init__(self, runtime: KataRuntime, config: ContainerConfig) -> None:
        self._runtime = runtime
        self._config = config
        self._id = config.id
        self._vm: Vm | None = None
        self._relays: dict[str, ProcessRelay] = {}  # exec id ("" = init) -> its stdio relay

    @property
    def _joined(self) -> Vm:
        if self._vm is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{self._id} is not in a VM")
        return self._vm

    async def create(self) -> Launched | None:
        """The container created in the guest; with a checkpoint, only prepared: start
        restores it there (CRIU in the guest) from the image, shared with the VM."""
        bundle = self._config.bundle
        checkpoint = self._config.checkpoint
        spec = oci.read_spec(bundle)
        if not spec:
            raise TtrpcError(Code.INVALID_ARGUMENT, "cannot read the OCI spec")
        self._vm = vm = await self._runtime.join(self._config, spec)
        record_vm(bundle, vm.paths)
        Path(bundle, INIT_PID_FILE).write_text(str(vm.pid))
        rootfs = os.path.join(bundle, (spec.get("root") or {}).get("path") or "rootfs")
        mounts = spec.get("mounts") or []
        binds = {
            shared_bind_name(i): (m["source"], is_recursive(m))
            for i, m in enumerate(mounts)
            if is_bind(m)
        }
        if checkpoint:
            binds[CHECKPOINT_IMAGE] = (checkpoint, False)
        submounts = vm.share(self._id, rootfs, binds)
        sandbox = annotation(spec, SANDBOX_ID)
        guest = guest_spec(
            spec,
            self._id,
            vm_pid=vm.pid,
            sandbox_guest_pid=self._runtime.guest_pids.get(sandbox),
            vm_netns=vm.netns,
            submounts=submounts,
        )
        relay = ProcessRelay(vm.agent, self._id, "", self._config.stdio)
        shared = container_dir_in_guest(self._id)
        try:
            self._runtime.guest_pids[self._id] = await vm.agent.create_container(
                self._id,
                guest,
                f"{shared}/rootfs",
                relay.agent_stdio,
                checkpoint=f"{shared}/{CHECKPOINT_IMAGE}" if checkpoint else "",
            )
        except BaseException:
            await relay.close()
            raise
        self._relays[""] = relay
        return None if checkpoint else self._launched(vm, "", relay)

    def _launched(self, vm: Vm, exec_id: str, relay: ProcessRelay) -> Launched:
        relay.start()
        exited = asyncio.ensure_future(self._exit_of(vm, exec_id, relay))
        return Launched(pid=vm.pid, exited=exited, console_master=relay.hand_out_console())

    async def _exit_of(self, vm: Vm, exec_id: str, relay: ProcessRelay) -> Exit:
        assert vm.exited is not None
        waiting = asyncio.ensure_future(vm.agent.wait_process(self._id, exec_id))
        racing: list[asyncio.Future[Any]] = [waiting, vm.exited]
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
            status = waiting.result()
            await vm.oom_reported(status.oom_sequence)  # TaskOOM before TaskExit
            await relay.drained(OUTPUT_DRAIN_TIMEOUT)
            return Exit(vm.pid, status.exit_status, status.exited_at.ToNanoseconds())
        waiting.cancel()
        name = exec_id or "init"
        if vm.exited.done():
            log.warning("%s/%s: the VM is gone", self._id, name)
        else:  # the VM runs: the agent failed this wait, and the process's status is unknown
            problem = waiting.exception() if not waiting.cancelled() else None
            log.error("%s/%s: WaitProcess failed: %r", self._id, name, problem)
        return Exit(vm.pid, VM_GONE_STATUS, time.time_ns())

    async def start(self) -> Launched | None:
        vm = self._joined
        await vm.agent.start_container(self._id)
        if not self._config.checkpoint:
            return None
        unshare_checkpoint(vm.paths, self._id)  # restored: the place is free for a checkpoint
        return self._launched(vm, "", self._relays[""])

    async def exec(self, exec_id: str, process: Mapping[str, Any], stdio: ProcessStdio) -> Launched:
        vm = self._joined
        relay = ProcessRelay(vm.agent, self._id, exec_id, stdio)
        try:
            await vm.agent.exec_process(
                self._id, exec_id, guest_process(process), relay.agent_stdio
            )
        except BaseException:
            await relay.close()
            raise
        self._relays[exec_id] = relay
        return self._launched(vm, exec_id, relay)

    async def kill(self, signal: int, all_processes: bool) -> None:
        try:
            await self._joined.agent.signal_process(self._id, "", signal, all=all_processes)
        except VmGone:
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found") from None

    async def kill_exec(self, exec_id: str, signal: int) -> bool:
        try:
            await self._joined.agent.signal_process(self._id, exec_id, signal)
        except VmGone:
            raise TtrpcError(Code.NOT_FOUND, "process already finished") from None
        return True

    async def delete_exec(self, exec_id: str) -> None:
        relay = self._relays.pop(exec_id, None)
        if relay is not None:
            await relay.close()
        with contextlib.suppress(VmGone):
            await self._joined.agent.remove_process(self._id, exec_id)

    async def delete(self, force: bool = False) -> None:
        # Taken out first: an exec's delete_exec may run while a relay closes.
        relays, self._relays = list(self._relays.values()), {}
        for relay in relays:
            await relay.close()
        vm = self._vm
        if vm is not None:
            vm.forget(self._id)
            # The VM's last container takes the VM with it (leave, below): runc's delete in the
            # guest (~0.5 s under TCG) would clean up what is about to be killed whole.
            if not self._runtime.is_last(self._id):
                try:
                    await vm.agent.remove_container(self._id)
                except TtrpcError as exc:  # the VM is gone, or the create never got there
                    if not (force or isinstance(exc, VmGone) or exc.code is Code.NOT_FOUND):
                        raise
            unshare_container(vm.paths, self._id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._config.bundle, INIT_PID_FILE))
        await self._runtime.leave(self._id)

    async def checkpoint(self, request: CheckpointRequest) -> None:
        """CRIU's image written by the guest (the OCI runtime's checkpoint there) straight into
        the directory containerd gives, bound into the VM's shared directory meanwhile."""
        from google.protobuf.any_pb2 import Any as AnyProto

        vm = self._joined
        oci.refuse_incremental_checkpoint(
            request, "the guest sees the image dir only, never a parent image beside it"
        )
        options = oci.checkpoint_options(request)
        image = options.image_path or request.path
        try:
            os.makedirs(image, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"checkpoint path {image}: {exc}") from exc
        if not os.access(image, os.W_OK):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"checkpoint path {image} is not writable")
        # The guest has its own work directory: host paths mean nothing there.
        options.image_path = options.work_path = ""
        in_guest = vm.share_checkpoint(self._id, image)
        try:
            await vm.agent.checkpoint_container(
                self._id,
                in_guest,
                AnyProto(type_url=oci.CHECKPOINT_OPTIONS_URL, value=options.SerializeToString()),
                log_path=f"{container_dir_in_guest(self._id)}/{CHECKPOINT_LOG}",
            )
        except TtrpcError as exc:
            kept = keep_checkpoint_log(vm.paths, self._id, self._config.bundle)
            if kept is None:
                raise
            raise TtrpcError(exc.code, f"{exc.message} path= {kept}") from None
        finally:
            unshare_checkpoint(vm.paths, self._id)

    async def pause(self) -> None:
        await self._joined.agent.pause_container(self._id)

    async def resume(self) -> None:
        await self._joined.agent.resume_container(self._id)

    async def pids(self) -> Sequence[int]:
        """QEMU's pid, as for every process of the VM: a guest pid means nothing on the host,
        and a host tool given one would act on an unrelated process (Kata does the same)."""
        return [self._joined.pid]

    async def update(self, resources: Mapping[str, Any]) -> None:
        await self._joined.agent.update_container(self._id, dict(resources))

    async def stats(self) -> Any:
        return await self._joined.agent.stats_container(self._id)

    async def resize(self, exec_id: str, width: int, height: int) -> None:
        relay = self._relays.get(exec_id)
        if relay is not None and relay.console_master is not None:
            await self._joined.agent.tty_win_resize(self._id, exec_id, rows=height, columns=width)

    def reports_oom(self, report: Callable[[], None]) -> bool:
        self._joined.report_oom(self._id, report)
        return True
