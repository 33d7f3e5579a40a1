"""What ``start`` learns from containerd, and its answer in the form that containerd reads.

| containerd | gives ``start``                                 | reads back                  |
|------------|-------------------------------------------------|-----------------------------|
| 1.6        | flags; stdin: runtime options (an Any), or none | a plain address             |
| 1.7        | the same + env GRPC_ADDRESS, NAMESPACE,         | plain, or JSON version <= 2 |
|            | MAX_SHIM_VERSION=2                              |                             |
| 2.0 - 2.2  | exactly what 1.7 gives                          | plain, or JSON version <= 3 |
| 2.3        | the same flags and env; stdin: protobuf         | protobuf BootstrapResult    |
|            | BootstrapParams (runtime options as extension)  | (or the legacy forms)       |

JSON version 3 makes containerd use the Task API v3; 1.7 fails the start on it, so it is sent
only when containerd is known to be 2.x: its executable (``-publish-binary``) is built from the
``github.com/containerd/containerd/v2`` Go module. When in doubt the answer is one that every
version reads the same way (version 2).

Standard library only unless stdin holds something: ``start`` is on the hot path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from shim.flags import Flags
from shim.sys.gobuildinfo import go_module_info

TASK_API_V2 = 2
TASK_API_V3 = 3
PROTOCOL = "ttrpc"
CONTAINERD_V2_MODULE = "github.com/containerd/containerd/v2"


class StartRequest:
    """The parameters of one ``start``, from BootstrapParams when containerd sent them.

    A plain class: importing dataclasses would cost every ``start`` ~10 ms."""

    def __init__(
        self,
        flags: Flags,
        socket_dir: str = "",  # "" = the default directory
        ttrpc_address: str = "",  # "" = from the environment
        bootstrap_params: bool = False,  # answer with a protobuf BootstrapResult
    ) -> None:
        self.flags = flags
        self.socket_dir = socket_dir
        self.ttrpc_address = ttrpc_address
        self.bootstrap_params = bootstrap_params

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StartRequest) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"StartRequest(**{vars(self)!r})"


def read_request(flags: Flags, stdin: bytes) -> StartRequest:
    """The request from the flags, or from 2.3's BootstrapParams when stdin holds them (older
    containerds put the runtime options there, which ``start`` ignores: Create brings them)."""
    if not stdin:
        return StartRequest(flags)
    from google.protobuf.message import DecodeError

    from shim.api.runtime.bootstrap.v1.bootstrap_pb2 import LOG_LEVEL_DEBUG, BootstrapParams

    try:
        params = BootstrapParams.FromString(stdin)
    except DecodeError:
        return StartRequest(flags)
    # An Any (type_url 1, value 2) may decode too; containerd always fills these in params.
    if not (params.containerd_version or params.containerd_grpc_address):
        return StartRequest(flags)
    flags = Flags(**vars(flags))  # a copy: the caller's flags stay as they were
    flags.id = params.instance_id or flags.id
    flags.namespace = params.namespace or flags.namespace
    flags.address = params.containerd_grpc_address or flags.address
    flags.publish_binary = params.containerd_binary or flags.publish_binary
    flags.debug = params.log_level <= LOG_LEVEL_DEBUG  # more verbose levels are lower
    return StartRequest(
        flags=flags,
        socket_dir=params.socket_dir,
        ttrpc_address=params.containerd_ttrpc_address.removeprefix("unix://"),
        bootstrap_params=True,
    )


def answer(request: StartRequest, address: str, environ: Mapping[str, str]) -> bytes:
    """What ``start`` prints for a shim listening at ``address`` (``unix://...``)."""
    if request.bootstrap_params:
        from shim.api.runtime.bootstrap.v1.bootstrap_pb2 import BootstrapResult

        result = BootstrapResult(version=TASK_API_V3, address=address, protocol=PROTOCOL)
        return result.SerializeToString()
    max_version = environ.get("MAX_SHIM_VERSION")
    if max_version is None:
        return address.encode()  # 1.6 takes stdout verbatim as the address
    version = TASK_API_V2
    if _int(max_version) >= TASK_API_V3 or containerd_is_v2(request.flags.publish_binary):
        version = TASK_API_V3
    bootstrap = {"version": version, "address": address, "protocol": PROTOCOL}
    return json.dumps(bootstrap, separators=(",", ":")).encode()


def containerd_is_v2(executable: str) -> bool:
    """Whether the containerd that runs us is 2.x (also when embedded, e.g. in k3s)."""
    modules = go_module_info(executable) if executable else None
    if modules is None:
        return False
    # The main package's "path" line, or the module in a "mod" or "dep" line.
    return any(f"\t{CONTAINERD_V2_MODULE}{end}" in modules for end in ("/", "\t"))


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
