"""The pod's NIC in the guest: UpdateInterface and UpdateRoutes of the Agent API.

The NIC is found by its MAC (the host gave QEMU the pod veth's); it lives in the guest's root
network namespace, where the pod's sandbox container runs and the other containers join it.
"""

from __future__ import annotations

import errno

from shim.agent.netlink import Netlink, link_by_mac
from shim.api.agent.v1 import agent_pb2 as api
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
