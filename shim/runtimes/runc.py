"""The runc backend: drives the runc CLI (or any binary that speaks it)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from shim.runtimes import criu, oci
from shim.runtimes.base import CheckpointRequest, Container, ContainerConfig, Launched, Runtime
from shim.runtimes.oci import last_runtime_error
from shim.runtimes.spec import namespace_path, network_namespace
from shim.sys.loopback import bring_up_loopback
from shim.sys.namespaces import run_in_netns
from shim.sys.spawn import CommandResult, run_command
from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

OPTIONS_URL = "containerd.runc.v1.Options"
DEFAULT_ROOT = "/run/containerd/runc"
FEATURES_TIMEOUT = 10.0


@dataclass(frozen=True)
class RuncOptions(oci.CliOptions):
    """The parts of containerd.runc.v1.Options this backend uses."""

    binary_name: str = "runc"
    root: str = DEFAULT_ROOT
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    criu_work_path: str = ""

    def may_hold(self, namespace: str, container_id: str) -> bool:
        # runc keeps a container's state in a directory named by its id, gone once deleted.
        if os.path.basename(self.binary_name) != "runc":
            return True
        return os.path.lexists(os.path.join(self.root, namespace, container_id))

    @classmethod
    def from_any(cls, options: Any | None) -> RuncOptions:
        if options is None or options.type_url != OPTIONS_URL:
            if options is not None and options.type_url:
                log.info("ignoring runtime options of type %s", options.type_url)
            return cls()
        from shim.api.runc.options_pb2 import Options

        decoded = Options.FromString(options.value)
        return cls(
            binary_name=decoded.binary_name or "runc",
            root=decoded.root or DEFAULT_ROOT,
            systemd_cgroup=decoded.systemd_cgroup,
            no_pivot_root=decoded.no_pivot_root,
            no_new_keyring=decoded.no_new_keyring,
            criu_work_path=decoded.criu_work_path,
        )

    def extra_global_args(self) -> list[str]:
        return ["--systemd-cgroup"] if self.systemd_cgroup else []


class RuncContainer(oci.OciCliContainer):
    options: RuncOptions

    def __init__(self, runtime: RuncRuntime, config: ContainerConfig) -> None:
        super().__init__(runtime, config, RuncOptions.from_any(config.options))

    def _create_flags(self) -> list[str]:
        flags = []
        if self.options.no_pivot_root:
            flags.append("--no-pivot")
        if self.options.no_new_keyring:
            flags.append("--no-new-keyring")
        return flags

    def _restore_work_path(self) -> str:
        return self.options.criu_work_path or os.path.join(self._bundle, "work")

    def _restore_flags(self) -> list[str]:
        # No --parent-path: `runc restore` has no such flag (go-runc passes it, and containerd
        # never sets CreateTaskRequest.parent_checkpoint); an incremental image names its parent
        # itself (the `parent` link `runc checkpoint --parent-path` leaves in it).
        return ["--work-path", self._restore_work_path(), "--no-subreaper"]

    def _raise_if_failed(self, operation: str, result: CommandResult) -> None:
        if operation == "restore" and result.status != 0:  # with CRIU's reasons
            criu_log = os.path.join(self._restore_work_path(), criu.RESTORE_LOG)
            kept = criu_log if os.path.isfile(criu_log) else None
            raise self._criu_failure(operation, result, criu_log, kept)
        super()._raise_if_failed(operation, result)

    def _criu_failure(
        self, operation: str, result: CommandResult, criu_log: str, kept: str | None
    ) -> TtrpcError:
        """The runtime's own message with CRIU's errors from `criu_log` and where it is kept."""
        message = last_runtime_error(self._bundle, result)
        detail = criu.describe_failure(message, criu.log_errors(criu_log), kept)
        return TtrpcError(Code.UNKNOWN, f"OCI runtime {operation} failed: {detail}")

    async def start(self) -> Launched | None:
        launched = await super().start()
        if launched is not None and network_namespace(oci.read_spec(self._bundle)) == "":
            # runc has CRIU restore a netns it made as an empty one ("runc doesn't manage
            # network devices"): its loopback is down, where runc's create had brought it up.
            netns = f"/proc/{launched.pid}/ns/net"
            try:
                run_in_netns(netns, bring_up_loopback)
            except OSError as exc:
                log.warning("restored container %s: loopback not brought up: %s", self._id, exc)
        return launched

    async def stats(self) -> Any:
        from shim.sys.cgroups import Cgroup

        try:
            return Cgroup.for_pid(self._pid).stats()
        except OSError as exc:
            raise TtrpcError(Code.NOT_FOUND, f"cgroup does not exist: {exc}") from exc

    async def checkpoint(self, request: CheckpointRequest) -> None:
        options = oci.checkpoint_options(request)
        # The client's choice first: containerd 1.x gives a runtime not named io.containerd.runc.*
        # a temporary dir of its own whatever image_path says (2.x gives image_path).
        image = options.image_path or request.path
        if not image:
            raise TtrpcError(Code.INVALID_ARGUMENT, "checkpoint: no image path")
        incremental = incremental_flags(options, oci.incremental_checkpoint(request), image)
        # A work dir of our own goes afterwards (as containerd's runc shim does); the client's
        # stays, with CRIU's log in it.
        work = options.work_path or os.path.join(self._bundle, "work", "criu-work")
        args = ["checkpoint", "--image-path", image, "--work-path", work, *incremental]
        flag_options = (
            (options.open_tcp, "--tcp-established"),
            (options.external_unix_sockets, "--ext-unix-sk"),
            (options.terminal, "--shell-job"),
            (options.file_locks, "--file-locks"),
            (not options.exit, "--leave-running"),
        )
        args += [flag for enabled, flag in flag_options if enabled]
        for namespace in options.empty_namespaces:
            args += ["--empty-ns", namespace]
        if options.cgroups_mode:
            args += ["--manage-cgroups-mode", options.cgroups_mode]
        try:
            result = await self._dump(*args, self._id)
            if result.status != 0:
                # Kept beside an image the client chose, else in the bundle (as containerd's
                # runc shim does): containerd removes an image dir of its own on failure.
                criu_log = os.path.join(work, criu.DUMP_LOG)
                destinations = [*filter(None, [options.image_path]), self._bundle]
                kept = criu.keep_log(criu_log, destinations)
                raise self._criu_failure("checkpoint", result, criu_log, kept)
        finally:
            if not options.work_path:
                shutil.rmtree(work, ignore_errors=True)

    async def _dump(self, *args: str) -> CommandResult:
        """`runc checkpoint`, inside the UTS namespace the container joined by path, if any.

        That one is its pod's (CRI's sandbox), and so is its hostname. CRIU leaves a namespace
        it runs in out of the image; else it dumps it, and the restore into another pod (runc
        has CRIU join that pod's UTS namespace) writes this pod's hostname over that pod's, as
        seen in pykata's guest. runc itself keeps only a network namespace given by path out."""
        uts = namespace_path(oci.read_spec(self._bundle), "uts")
        if not uts:
            return await self._cli(*args)
        runc = self.options.global_args(self._context.namespace, self._bundle)
        return await run_command(
            self._context.reaper, ["nsenter", f"--uts={uts}", "--", *runc, *args]
        )

    async def on_init_exit(self) -> None:
        if not self._has_own_pid_namespace():
            # Nobody else would kill what the container left behind in the host's pid namespace.
            await self._cli("kill", "--all", self._id, "9")

    def _has_own_pid_namespace(self) -> bool:
        namespaces = oci.read_spec(self._bundle).get("linux", {}).get("namespaces", [])
        return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


def incremental_flags(options: Any, incremental: Any, image: str) -> list[str]:
    """runc's flags for a pre-dump or a dump on a parent image (pyshim.checkpoint.v1), checked
    first: runc would destroy a container it was told to exit after a pre-dump it refused."""
    flags = []
    if incremental.pre_dump:
        if options.exit:
            message = "checkpoint: a pre-dump leaves the container running, exit cannot be set"
            raise TtrpcError(Code.INVALID_ARGUMENT, message)
        flags.append("--pre-dump")
    if incremental.parent_path:
        # CRIU links the image to its parent relative to the image dir, and runc takes only
        # such a path: an absolute one is made relative here.
        image = os.path.realpath(image)
        parent = os.path.realpath(os.path.join(image, incremental.parent_path))
        if not os.path.isfile(os.path.join(parent, "inventory.img")):
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                f"checkpoint: parent {incremental.parent_path!r} ({parent}) is no CRIU image",
            )
        flags += ["--parent-path", os.path.relpath(parent, image)]
    return flags


class RuncRuntime(Runtime):
    def container(self, config: ContainerConfig) -> Container:
        return RuncContainer(self, config)

    @classmethod
    def features(cls, options: Any | None) -> bytes | None:
        argv = [RuncOptions.from_any(options).binary_name, "features"]
        try:
            result = subprocess.run(argv, capture_output=True, timeout=FEATURES_TIMEOUT, check=True)
            json.loads(result.stdout)  # containerd decodes it as JSON
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("%s: %s", " ".join(argv), exc)  # e.g. a runtime without `features`
            return None
        return result.stdout

    @classmethod
    def cleanup(cls, namespace: str, bundle: str, container_id: str) -> int:
        return oci.cleanup(RuncOptions.load(bundle), namespace, bundle, container_id)
