"""Service descriptions: which methods a ttrpc service has and their message classes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass


@dataclass(frozen=True)
class Method:
    name: str
    request_type: type[Message]
    response_type: type[Message]


@dataclass(frozen=True)
class Service:
    name: str  # full name on the wire, e.g. "containerd.task.v2.Task"
    methods: Mapping[str, Method]


def service_from_descriptor(descriptor: ServiceDescriptor) -> Service:
    """Describe a service from its generated descriptor (`<module>.DESCRIPTOR.services_by_name`).

    Streaming methods are not supported by this package yet and are rejected.
    """
    methods: dict[str, Method] = {}
    for method in descriptor.methods:
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{descriptor.full_name}.{method.name}: streaming is not supported")
        methods[method.name] = Method(
            method.name, GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        )
    return Service(descriptor.full_name, MappingProxyType(methods))
