"""containerd's Tasks gRPC API (containerd.services.tasks.v1) as a client calls it, for what ctr
cannot ask for: checkpoint options for a runtime not named io.containerd.runc.*, and a task
created from a checkpoint descriptor with the rootfs of an existing container.

Only the few messages the tests send, encoded by hand (field numbers from containerd 1.6.20's
api/services/tasks/v1/tasks.proto; 2.x keeps them): containerd's service protos are not among
the APIs scripts/genproto builds, and a test needs no more than this.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf.any_pb2 import Any as AnyProto
from harness import PrivateContainerd

from shim.api.types.mount_pb2 import Mount

SERVICE = "/containerd.services.tasks.v1.Tasks/"
CRIU_CHECKPOINT = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CALL_TIMEOUT = 600.0  # a dump of 64 MiB under TCG takes minutes on a loaded machine


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings and embedded messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _length_delimited(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The length-delimited fields of a message, skipping varints (all a response here has)."""
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _read_varint(data, position)
        elif wire_type == 2:
            length, position = _read_varint(data, position)
            yield number, data[position : position + length]
            position += length
        else:
            raise ValueError(f"unexpected wire type {wire_type} in field {number}")


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    encoded: bytes  # containerd.types.Descriptor as containerd sent it


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

    def _call(self, method: str, request: bytes) -> bytes:
        with grpc.insecure_channel(f"unix://{self.containerd.address}") as channel:
            call = channel.unary_unary(SERVICE + method)
            answer: bytes = call(request, metadata=self.metadata, timeout=CALL_TIMEOUT)
            return answer

    def checkpoint(self, container_id: str, options: AnyProto) -> list[Descriptor]:
        """CheckpointTaskRequest; the descriptors of what containerd put in its content store
        (none when the options' image_path reached a runtime that containerd lets keep it)."""
        request = _field(1, container_id.encode()) + _field(3, options.SerializeToString())
        descriptors = []
        for number, encoded in _length_delimited(self._call("Checkpoint", request)):
            if number == 1:
                fields = dict(_length_delimited(encoded))  # media_type 1, digest 2
                descriptors.append(Descriptor(fields[1].decode(), fields[2].decode(), encoded))
        return descriptors

    def restore(self, container_id: str, checkpoint: Descriptor) -> None:
        """A task of the existing container created from `checkpoint` (containerd unpacks it
        into a temporary dir for the shim), with the container's snapshot as its rootfs and no
        stdio, then started."""
        rootfs = self.rootfs(container_id).SerializeToString()
        request = (
            _field(1, container_id.encode()) + _field(3, rootfs) + _field(8, checkpoint.encoded)
        )
        self._call("Create", request)
        self._call("Start", _field(1, container_id.encode()))

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
