"""The kubelet's side of CRI, for tests: pods and containers through containerd's CRI gRPC API
(the `container-runtime-interface-api` client), with the settings a test needs and no more."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1.api_pb2_grpc import ImageServiceStub, RuntimeServiceStub
from harness import PrivateContainerd

NODE = cri.NamespaceMode.NODE
CONTAINER = cri.NamespaceMode.CONTAINER
POD = cri.NamespaceMode.POD
VM_HANDLERS = {"pykata"}  # a VM cannot share the node's network: its pods always get a netns
CALL_TIMEOUT = 120.0  # a gVisor sandbox or a module compile takes seconds; a hang fails


class Pod:
    """A pod sandbox the client made: its id and the config every later call repeats."""

    def __init__(self, id: str, config: cri.PodSandboxConfig, handler: str) -> None:
        self.id = id
        self.config = config
        self.handler = handler

    @property
    def log_directory(self) -> Path:
        return Path(self.config.log_directory)


@contextmanager
def cri_client(containerd: PrivateContainerd) -> Iterator[CriClient]:
    """A client of this containerd's CRI plugin; on exit every pod is removed."""
    client = CriClient(containerd.address, containerd.cgroup_parent, containerd.base / "pod-logs")
    try:
        yield client
    finally:
        client.remove_all()
        client.close()


class CriClient:
    def __init__(self, address: str, cgroup_parent: str, log_root: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = RuntimeServiceStub(self.channel)
        self.images = ImageServiceStub(self.channel)
        self.cgroup_parent = "/" + cgroup_parent.strip("/")
        self.log_root = log_root
        self.created: set[str] = set()  # every pod and container id, for leftover checks
        self.netns_paths: set[Path] = set()  # the network namespaces of our CNI pods

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the CRI plugin answers Status: after a containerd (re)start, it serves the
        gRPC socket a moment before its own state is loaded ("server is not initialized")."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("Status", cri.StatusRequest(), timeout=5)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def call(self, method: str, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return getattr(self.runtime, method)(request, timeout=timeout)

    # -- pods ------------------------------------------------------------------------------

    def run_pod(
        self,
        handler: str,
        name: str = "",
        pid_mode: int = CONTAINER,
        annotations: Mapping[str, str] | None = None,
        network: int | None = None,
        hostname: str = "",
        dns: cri.DNSConfig | None = None,
        privileged: bool = False,
    ) -> Pod:
        """A pod under the test's cgroup parent: with network=POD in a network namespace of its
        own on the session's CNI network, with NODE on the host's network. The default is the
        host's, except for a VM handler."""
        if network is None:
            network = POD if handler in VM_HANDLERS else NODE
        name = name or f"pod-{uuid.uuid4().hex[:8]}"
        uid = uuid.uuid4().hex
        log_directory = self.log_root / uid
        log_directory.mkdir(parents=True)
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0),
            log_directory=str(log_directory),
            hostname=hostname,
            dns_config=dns,
            annotations=dict(annotations or {}),
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=cri.LinuxSandboxSecurityContext(
                    # a pod network is the pod's own; IPC only follows it (as the kubelet's
                    # hostIPC: false)
                    namespace_options=cri.NamespaceOption(
                        network=network, pid=pid_mode, ipc=NODE if network == NODE else POD
                    ),
                    privileged=privileged,  # a pod with a privileged container must be
                ),
            ),
        )
        response = self.call(
            "RunPodSandbox", cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
        )
        self.created.add(response.pod_sandbox_id)
        pod = Pod(response.pod_sandbox_id, config, handler)
        if network != NODE:
            self.netns_paths.update(self.namespace_paths(pod, "network"))
        return pod

    def pod_ip(self, pod: Pod) -> str:
        """The address CNI gave the pod, as PodSandboxStatus reports it."""
        return str(self.pod_status(pod).status.network.ip)

    def namespace_paths(self, pod: Pod, kind: str) -> list[Path]:
        """The paths of the pod's namespaces of this kind in its sandbox's OCI spec (the
        verbose status's info): containerd's bind mount of a CNI pod's netns, for instance."""
        info = json.loads(self.pod_status(pod, verbose=True).info.get("info", "{}"))
        namespaces = (info.get("runtimeSpec") or {}).get("linux", {}).get("namespaces", [])
        return [Path(n["path"]) for n in namespaces if n.get("type") == kind and n.get("path")]

    def netns_left(self) -> list[Path]:
        """The network namespaces of our pods that containerd has not removed."""
        return sorted(p for p in self.netns_paths if p.exists())

    def pod_status(self, pod: Pod | str, verbose: bool = False) -> Any:
        pod_id = pod.id if isinstance(pod, Pod) else pod
        return self.call(
            "PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        )

    def stop_pod(self, pod: Pod | str) -> None:
        pod_id = pod.id if isinstance(pod, Pod) else pod
        self.call("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod: Pod | str) -> None:
        pod_id = pod.id if isinstance(pod, Pod) else pod
        self.call("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def list_pods(self) -> list[Any]:
        return list(self.call("ListPodSandbox", cri.ListPodSandboxRequest()).items)

    def remove_all(self) -> None:
        """Stop and remove every pod (and so its containers), as a kubelet draining a node."""
        for pod in self.list_pods():
            self.stop_pod(pod.id)
            self.remove_pod(pod.id)

    # -- containers ------------------------------------------------------------------------

    def create_container(
        self,
        pod: Pod,
        image: str,
        command: Sequence[str],
        name: str = "",
        tty: bool = False,
        stdin: bool = False,
        memory_limit: int = 0,
        env: Mapping[str, str] | None = None,
        privileged: bool = False,
        capabilities: Sequence[str] = (),
        seccomp: cri.SecurityProfile | None = None,
        readonly_paths: Sequence[str] = (),
        masked_paths: Sequence[str] = (),
        mounts: Sequence[cri.Mount] = (),
    ) -> str:
        """`capabilities` are added (CRI's add_capabilities, "ALL" for every one); `seccomp`
        unset is containerd's default (unconfined); `readonly_paths` and `masked_paths` replace
        the runtime's; `mounts` are the container's volumes."""
        name = name or f"c-{uuid.uuid4().hex[:8]}"
        added = cri.Capability(add_capabilities=list(capabilities)) if capabilities else None
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=image),
            command=list(command),
            envs=[cri.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            log_path=f"{name}.log",
            tty=tty,
            stdin=stdin,
            mounts=list(mounts),
            linux=cri.LinuxContainerConfig(
                resources=cri.LinuxContainerResources(memory_limit_in_bytes=memory_limit),
                # As the kubelet: the pod's namespace modes (unset, pid would be POD, i.e.
                # shareProcessNamespace, where gVisor ties siblings to the first one's init).
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=pod.config.linux.security_context.namespace_options,
                    privileged=privileged,
                    capabilities=added,
                    seccomp=seccomp,
                    readonly_paths=list(readonly_paths),
                    masked_paths=list(masked_paths),
                ),
            ),
        )
        request = cri.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config
        )
        container_id = str(self.call("CreateContainer", request).container_id)
        self.created.add(container_id)
        return container_id

    def start_container(self, container_id: str) -> None:
        self.call("StartContainer", cri.StartContainerRequest(container_id=container_id))

    def run_container(self, pod: Pod, image: str, command: Sequence[str], **kwargs: Any) -> str:
        container_id = self.create_container(pod, image, command, **kwargs)
        self.start_container(container_id)
        return container_id

    def container_status(self, container_id: str) -> Any:
        request = cri.ContainerStatusRequest(container_id=container_id, verbose=True)
        return self.call("ContainerStatus", request)

    def state(self, container_id: str) -> int:
        return int(self.container_status(container_id).status.state)

    def wait_exited(self, container_id: str, timeout: float = 60) -> Any:
        """The ContainerStatus once the container is EXITED; TimeoutError if it is not."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id).status
            if status.state == cri.ContainerState.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{container_id} still {status.state} after {timeout}s")
            time.sleep(0.1)

    def stop_container(self, container_id: str, grace: int = 10) -> None:
        request = cri.StopContainerRequest(container_id=container_id, timeout=grace)
        self.call("StopContainer", request, timeout=grace + CALL_TIMEOUT)

    def remove_container(self, container_id: str) -> None:
        self.call("RemoveContainer", cri.RemoveContainerRequest(container_id=container_id))

    def exec_sync(self, container_id: str, command: Sequence[str], timeout: int = 0) -> Any:
        request = cri.ExecSyncRequest(container_id=container_id, cmd=list(command), timeout=timeout)
        return self.call("ExecSync", request, timeout=(timeout or 60) + CALL_TIMEOUT)

    def stats(self, container_id: str) -> Any:
        return self.call("ContainerStats", cri.ContainerStatsRequest(container_id=container_id))

    def list_stats(self, pod: Pod) -> list[Any]:
        request = cri.ListContainerStatsRequest(
            filter=cri.ContainerStatsFilter(pod_sandbox_id=pod.id)
        )
        return list(self.call("ListContainerStats", request).stats)

    def update_resources(self, container_id: str, **resources: int) -> None:
        request = cri.UpdateContainerResourcesRequest(
            container_id=container_id, linux=cri.LinuxContainerResources(**resources)
        )
        self.call("UpdateContainerResources", request)

    def checkpoint(self, container_id: str, location: Path) -> None:
        """Kubernetes' forensic checkpoint: the archive of the running container at location."""
        request = cri.CheckpointContainerRequest(container_id=container_id, location=str(location))
        self.call("CheckpointContainer", request)

    def pull_image(self, image: str) -> str:
        """Pull through CRI (the node's registry configuration); the image's id."""
        request = cri.PullImageRequest(image=cri.ImageSpec(image=image))
        return str(self.images.PullImage(request, timeout=CALL_TIMEOUT).image_ref)

    def reopen_log(self, container_id: str) -> None:
        self.call("ReopenContainerLog", cri.ReopenContainerLogRequest(container_id=container_id))

    def log_lines(self, pod: Pod, container_id: str) -> list[tuple[str, str, str]]:
        """(stream, tag, message) of each line of the container's CRI log file."""
        path = Path(self.container_status(container_id).status.log_path)
        lines = []
        for line in path.read_text(errors="replace").splitlines():
            _time, stream, tag, message = ([*line.split(" ", 3), ""])[:4]
            lines.append((stream, tag, message))
        return lines
