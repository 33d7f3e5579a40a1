"""``<shim> -info``: the RuntimeInfo containerd 2.x asks for (introspection, and before a Create
that uses idmapped mounts, to check the runtime's features). Stdin: the runtime options Any,
possibly empty; stdout: protobuf ``containerd.types.RuntimeInfo``.
"""

from __future__ import annotations

import logging

from google.protobuf.any_pb2 import Any
from google.protobuf.message import DecodeError

from shim import VERSION
from shim.api.types.introspection_pb2 import RuntimeInfo, RuntimeVersion
from shim.runtimes.registry import find_runtime, runtime_name_from_binary, runtime_type

log = logging.getLogger(__name__)

FEATURES_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"


def runtime_info(binary: str, stdin: bytes) -> RuntimeInfo:
    name = runtime_name_from_binary(binary)
    info = RuntimeInfo(name=runtime_type(name), version=RuntimeVersion(version=VERSION))
    options: Any | None = None
    if stdin:
        try:
            options = Any.FromString(stdin)
        except DecodeError as exc:
            log.warning("ignoring runtime options that do not decode: %s", exc)
    if options is not None:
        info.options.CopyFrom(options)
    features = find_runtime(name).features(options)
    if features is not None:
        info.features.CopyFrom(Any(type_url=FEATURES_URL, value=features))
    return info
