"""The pod's CNI network given to the VM, in Kata's tcfilter model.

In the pod's netns (made by CNI, holding a veth such as eth0) a tap device is created and
joined to the veth by two tc ingress qdiscs, each with a match-all u32 filter whose mirred
action redirects every frame to the other device's egress. QEMU gets the tap's fd and a
virtio-net NIC with the veth's MAC; the guest agent gives that NIC the veth's addresses, MTU
and routes. Frames of the pod's address then reach the guest unchanged, and the netns's own
stack (which keeps the address) never sees them.

The netns is entered by a thread of our own calling setns(2) (a thread's network namespace is
its own): no fork, so the daemon's one reaper is untouched (pyroute2's netns= forks helpers),
and a netlink socket or a tap opened by that thread belongs to the netns. pyroute2 (~22 MB,
~180 ms) is imported by the shim's template, and so shared by its daemons (KataRuntime.preload).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shim.api.agent.v1 import agent_pb2 as api
from shim.runtimes.cri import is_pod_sandbox
from shim.runtimes.spec import network_namespace
from shim.sys.namespaces import run_in_netns

log = logging.getLogger(__name__)


TAP_NAME = "tap0_pyk"
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000  # QEMU sees it (TUNGETIFF) and passes the guest's offloads through
_INGRESS_PARENT = 0xFFFF0000
_ETH_P_ALL = 0x0003
_ARPHRD_ETHER = 1
_RT_TABLE_MAIN = 254
_RTPROT_KERNEL = 2  # the prefix routes of addresses: the guest's kernel adds its own
_RTN_UNICAST = 1
_SCOPE_UNIVERSE = 0


class HostNetworkRefused(Exception):
    pass


# -- what the spec asks for ------------------------------------------------------------------


def vm_netns(spec: Mapping[str, Any]) -> str:
    """The netns whose network the VM gets: that of the first container's spec, "" for none.
    A CRI sandbox on the node's network cannot have one: HostNetworkRefused."""
    path = network_namespace(spec)
    if is_pod_sandbox(spec) and not path:
        raise HostNetworkRefused(
            "pykata cannot run a hostNetwork pod: a VM cannot share the node's network "
            "namespace (give the pod its own network, or use another runtime handler)"
        )
    return path or ""


# -- what the netns holds --------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str
    mtu: int
    addresses: tuple[str, ...]  # CIDR: "198.18.0.5/24"


@dataclass(frozen=True)
class Route:
    destination: str  # CIDR; "0.0.0.0/0" or "::/0" for a default route
    gateway: str = ""
    source: str = ""  # the preferred source address
    scope: int = _SCOPE_UNIVERSE


@dataclass(frozen=True)
class PodNetwork:
    interface: Interface | None  # None: the netns has only loopback, the VM gets no NIC
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True)
class Plumbing:
    """Where the VM's tap is, recorded in the VM's directory before it is made: the cleanup
    (also after a killed shim) needs nothing else."""

    netns: str
    tap: str = TAP_NAME

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> Plumbing | None:
        try:
            record = json.loads(path.read_text())
            return cls(str(record["netns"]), str(record["tap"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Plumbed:
    network: PodNetwork
    tap_fd: int  # -1 with no interface; the caller closes it (the tap goes with its last fd)


def ordered_routes(routes: Sequence[Route]) -> tuple[Route, ...]:
    """Routes in an order the guest can add them in: on-link ones (scope link or host) before
    those through a gateway, which must be reachable when added."""
    return tuple(sorted(routes, key=lambda r: -r.scope))


# -- in the netns ----------------------------------------------------------------------------


def plumb(plumbing: Plumbing) -> Plumbed:
    """In the netns: describe its network and, if it has an interface, join a new tap to it.
    Nothing is left made on failure."""
    return run_in_netns(plumbing.netns, lambda: _plumb_here(plumbing))


def unplumb_recorded(record: Path) -> None:
    """Undo what the record (written before anything was made) says was made for a VM; a
    failure is logged: the VM goes regardless."""
    plumbing = Plumbing.read(record)
    if plumbing is None:
        return
    try:
        unplumb(plumbing)
    except Exception:
        log.exception("cannot remove the VM's tap and qdiscs in %s", plumbing.netns)


def unplumb(plumbing: Plumbing) -> None:
    """Remove the tap and both ingress qdiscs (their filters go with them), if the netns is
    still there."""
    try:
        run_in_netns(plumbing.netns, lambda: _unplumb_here(plumbing))
    except FileNotFoundError:
        pass  # the netns is gone, and everything in it
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: no longer a netns (CRI unmounted it)
            raise


def import_pyroute2() -> None:
    """pyroute2 imports ssl (for a probe we never use), which the template blocks in every
    daemon (shim.template): let it through here."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]
    import pyroute2  # noqa: F401


def _iproute() -> Any:
    """A pyroute2 IPRoute of the calling thread's netns."""
    import_pyroute2()
    from pyroute2 import IPRoute

    return IPRoute()


def _plumb_here(plumbing: Plumbing) -> Plumbed:
    with _iproute() as ipr:
        veth = _pod_link(ipr, plumbing.tap)
        if veth is None:
            return Plumbed(PodNetwork(None), -1)
        network = _describe(ipr, veth)
        assert network.interface is not None
        tap_fd = _open_tap(plumbing.tap)
        try:
            tap = ipr.link_lookup(ifname=plumbing.tap)[0]
            ipr.link("set", index=tap, mtu=network.interface.mtu, state="up")
            _redirect(ipr, veth["index"], tap)
            _redirect(ipr, tap, veth["index"])
        except BaseException:
            os.close(tap_fd)  # the tap is not persistent: it goes with its last fd
            _unplumb_here(plumbing)
            raise
        return Plumbed(network, tap_fd)


def _pod_link(ipr: Any, tap_name: str) -> Any:
    """The netns's Ethernet interface (CNI's veth), or None."""
    for link in ipr.get_links():
        name = link.get("ifname")
        if link["ifi_type"] == _ARPHRD_ETHER and name != tap_name:
            return link
    return None


def _describe(ipr: Any, link: Any) -> PodNetwork:
    index = link["index"]
    addresses = tuple(
        f"{a.get('address')}/{a['prefixlen']}"
        for a in ipr.get_addr(index=index)
        if a["scope"] == _SCOPE_UNIVERSE  # not link-local: the guest makes its own from the MAC
    )
    interface = Interface(link.get("ifname"), link.get("address"), link.get("mtu"), addresses)
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=family, table=_RT_TABLE_MAIN):
            if r.get("oif") != index or r["proto"] == _RTPROT_KERNEL or r["type"] != _RTN_UNICAST:
                continue
            default = "0.0.0.0" if family == socket.AF_INET else "::"
            destination = f"{r.get('dst') or default}/{r['dst_len']}"
            routes.append(
                Route(destination, r.get("gateway") or "", r.get("prefsrc") or "", r["scope"])
            )
    return PodNetwork(interface, ordered_routes(routes))


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, request)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _redirect(ipr: Any, source: int, target: int) -> None:
    """Every frame arriving on `source` leaves by `target`."""
    ipr.tc("add", "ingress", source)
    ipr.tc(
        "add-filter",
        "u32",
        source,
        parent=_INGRESS_PARENT,
        protocol=_ETH_P_ALL,
        target=0x10001,  # pyroute2 requires a class id; an ingress qdisc has no classes
        keys=["0x0/0x0+0"],  # match all
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target},
    )


def _unplumb_here(plumbing: Plumbing) -> None:
    with _iproute() as ipr:
        from pyroute2.netlink.exceptions import NetlinkError

        for index in ipr.link_lookup(ifname=plumbing.tap):
            try:
                ipr.link("del", index=index)  # its qdisc and filter go with it
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    raise
        # The veth's: the only ingress qdisc of a pod's netns is ours.
        for link in ipr.get_links():
            if link["ifi_type"] != _ARPHRD_ETHER:
                continue
            try:
                ipr.tc("del", "ingress", link["index"])
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    raise


_GONE = (errno.ENOENT, errno.EINVAL, errno.ENODEV)  # nothing there (any more) to remove


# -- for the agent ---------------------------------------------------------------------------


def interface_request(interface: Interface) -> api.Interface:
    return api.Interface(
        mac=interface.mac, mtu=interface.mtu, addresses=interface.addresses, name=interface.name
    )


def route_requests(routes: Sequence[Route]) -> list[api.Route]:
    return [
        api.Route(destination=r.destination, gateway=r.gateway, source=r.source, scope=r.scope)
        for r in routes
    ]
