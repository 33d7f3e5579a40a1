"""The pod's NIC in the guest: UpdateInterface and UpdateRoutes of the Agent API.

The NIC is found by its MAC (the host gave QEMU the pod veth's); it lives in the guest's root
network namespace, where the pod's sandbox container runs and the other containers join it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from shim.agent.netlink import Netlink, link_by_mac
from shim.api.agent.v1 import agent_pb2 as api
from shim.runtimes.spec import network_namespace
from shim.ttrpc.errors import Code, TtrpcError


def update_interface(interface: api.Interface) -> None:
    with _errors("UpdateInterface"):
        _, index = link_by_mac(interface.mac)
        with Netlink() as netlink:
            netlink.set_link_up(index, interface.mtu)
            for address in interface.addresses:
                netlink.add_address(index, address)


def update_routes(mac: str, routes: list[api.Route]) -> None:
    with _errors("UpdateRoutes"):
        _, index = link_by_mac(mac)
        with Netlink() as netlink:
            for route in routes:
                netlink.add_route(
                    index, route.destination, route.gateway, route.source, route.scope
                )


class _errors:
    """OSError and ValueError of a request as the TtrpcError the host sees."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, ValueError):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"{self._what}: {exc}") from exc
        if isinstance(exc, OSError):
            code = Code.NOT_FOUND if exc.errno == errno.ENODEV else Code.INTERNAL
            raise TtrpcError(code, f"{self._what}: {exc}") from exc


def take_root_netns_sysctls(spec: dict[str, Any]) -> None:
    """Write the spec's net.* sysctls ourselves when its container runs in the agent's own
    network namespace (a pod's sandbox: the guest's root netns holds the pod's NIC), and take
    them out of the spec: runc refuses them there ("not allowed in host network namespace"),
    while containerd 2.x gives every pod's sandbox some (ip_unprivileged_port_start, ...)."""
    sysctls = (spec.get("linux") or {}).get("sysctl") or {}
    path = network_namespace(spec)
    if not sysctls or (path is not None and not _is_own_netns(path)):
        return
    for key in [k for k in sysctls if k.startswith("net.")]:
        value = str(sysctls.pop(key))
        try:
            with open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
                f.write(value)
        except OSError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"sysctl {key}={value}: {exc}") from exc


def _is_own_netns(path: str) -> bool:
    if not path:
        return False  # a new netns
    try:
        theirs, ours = os.stat(path), os.stat("/proc/self/ns/net")
    except OSError:
        return False  # runc will say what is wrong with it
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
