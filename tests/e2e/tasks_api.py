"""containerd's Tasks gRPC API (containerd.services.tasks.v1) as a client calls it, for what ctr
cannot ask for: checkpoint options for a runtime not named io.containerd.runc.*, and a task
created from a checkpoint descriptor with the rootfs of an existing container.

containerd's service protos are not among the APIs scripts/genproto builds, so the few
messages the tests send and read are declared here, with only the fields used (numbers from
containerd 1.6.20's api/services/tasks/v1/tasks.proto and api/types/descriptor.proto; 2.x keeps
them); their Descriptor is in the service's package, not containerd.types. Fields not declared
pass through unchanged.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message
from harness import PrivateContainerd

from shim.api.types import mount_pb2
from shim.api.types.mount_pb2 import Mount

SERVICE = "/containerd.services.tasks.v1.Tasks/"
CALL_TIMEOUT = 600.0  # a dump of 64 MiB under TCG takes minutes on a loaded machine

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_INT64 = descriptor_pb2.FieldDescriptorProto.TYPE_INT64
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
# message: its fields as (name, number, type, label, message type)
_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "Descriptor": [  # containerd.types.Descriptor
        ("media_type", 1, _STRING, _OPTIONAL, ""),
        ("digest", 2, _STRING, _OPTIONAL, ""),
        ("size", 3, _INT64, _OPTIONAL, ""),
    ],
    "CheckpointTaskRequest": [
        ("container_id", 1, _STRING, _OPTIONAL, ""),
        ("options", 3, _MESSAGE, _OPTIONAL, ".google.protobuf.Any"),
    ],
    "CheckpointTaskResponse": [("descriptors", 1, _MESSAGE, _REPEATED, "Descriptor")],
    "CreateTaskRequest": [
        ("container_id", 1, _STRING, _OPTIONAL, ""),
        ("rootfs", 3, _MESSAGE, _REPEATED, ".containerd.types.Mount"),
        ("checkpoint", 8, _MESSAGE, _OPTIONAL, "Descriptor"),
    ],
    "StartRequest": [("container_id", 1, _STRING, _OPTIONAL, "")],
}


def _message_classes() -> dict[str, type[Message]]:
    pool = descriptor_pool.Default()  # where Any and Mount are: the messages take theirs
    package = "containerd.services.tasks.v1"
    subset = descriptor_pb2.FileDescriptorProto(
        name="pyshim-tests/tasks.proto",
        package=package,
        syntax="proto3",
        dependency=[any_pb2.DESCRIPTOR.name, mount_pb2.DESCRIPTOR.name],
    )
    for name, fields in _MESSAGES.items():
        message = subset.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:  # ours are named in this package
                field.type_name = type_name if type_name[0] == "." else f".{package}.{type_name}"
    pool.Add(subset)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
        for name in _MESSAGES
    }


_CLASSES = _message_classes()


def _new(name: str, **fields: Any) -> Any:
    return _CLASSES[name](**fields)


@contextmanager
def tasks_client(containerd: PrivateContainerd) -> Iterator[TasksClient]:
    """A client whose calls hold a lease (as containerd's Go client's do): what a checkpoint
    writes to the content store is safe from the garbage collector until the lease goes."""
    lease = f"pyshim-test-{os.getpid()}"
    containerd.ctr("leases", "create", "--id", lease)
    try:
        yield TasksClient(containerd, lease)
    finally:
        containerd.ctr("leases", "delete", lease, check=False)


class TasksClient:
    def __init__(self, containerd: PrivateContainerd, lease: str) -> None:
        self.containerd = containerd
        self.metadata = (
            ("containerd-namespace", containerd.namespace),
            ("containerd-lease", lease),
        )

    def _call(self, method: str, request: Message, response: str | None = None) -> Any:
        """The method's response, decoded as the message `response` (None: not read)."""
        with grpc.insecure_channel(f"unix://{self.containerd.address}") as channel:
            call = channel.unary_unary(
                SERVICE + method,
                response_deserializer=_CLASSES[response].FromString if response else None,
            )
            encoded = request.SerializeToString()
            return call(encoded, metadata=self.metadata, timeout=CALL_TIMEOUT)

    def checkpoint(self, container_id: str, options: AnyProto) -> list[Any]:
        """CheckpointTaskRequest; the descriptors (containerd.types.Descriptor) of what
        containerd put in its content store (none when the options' image_path reached a
        runtime that containerd lets keep it)."""
        request = _new("CheckpointTaskRequest", container_id=container_id, options=options)
        return list(self._call("Checkpoint", request, "CheckpointTaskResponse").descriptors)

    def restore(self, container_id: str, checkpoint: Any) -> None:
        """A task of the existing container created from `checkpoint` (containerd unpacks it
        into a temporary dir for the shim), with the container's snapshot as its rootfs and no
        stdio, then started."""
        request = _new(
            "CreateTaskRequest",
            container_id=container_id,
            rootfs=[self.rootfs(container_id)],
            checkpoint=checkpoint,
        )
        self._call("Create", request)
        self._call("Start", _new("StartRequest", container_id=container_id))

    def rootfs(self, container_id: str) -> Mount:
        """The mount of the container's snapshot (ctr names it after the container), from the
        command line `ctr snapshots mounts` prints: mount -t TYPE SOURCE TARGET -o OPTIONS."""
        printed = self.containerd.ctr(
            "snapshots", "--snapshotter", self.containerd.snapshotter, "mounts", "/", container_id
        )
        words = shlex.split(printed.stdout)
        options = words[words.index("-o") + 1].split(",") if "-o" in words else []
        type_ = words[words.index("-t") + 1]
        return Mount(type=type_, source=words[words.index("-t") + 2], options=options)
