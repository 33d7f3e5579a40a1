"""The few rtnetlink requests the guest agent makes for the pod's NIC, built by hand.

Why not pyroute2 (which the host side uses): in the guest every module is read over 9p under
TCG, and importing pyroute2 there took 2.96 s (this module: 0.04 s; on the host pyroute2 takes
0.14 s), a quarter of a VM's boot; these three requests (link up with an MTU, an address, a
route) need ~100 lines of struct packing. Each request is acknowledged (NLM_F_ACK), so an
error is raised where it happens.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

_NLMSG_ERROR = 2
_RTM_NEWLINK = 16
_RTM_NEWADDR = 20
_RTM_NEWROUTE = 24
_NLM_F_REQUEST = 0x01
_NLM_F_ACK = 0x04
_NLM_F_REPLACE = 0x100
_NLM_F_CREATE = 0x400
_IFF_UP = 0x1
_IFLA_ADDRESS = 1
_IFLA_MTU = 4
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFA_FLAGS = 8
_IFA_F_NODAD = 0x02  # the address is the pod's own: no duplicate detection delaying its use
_RTA_DST = 1
_RTA_OIF = 4
_RTA_GATEWAY = 5
_RTA_PREFSRC = 7
_RT_TABLE_MAIN = 254
_RTPROT_BOOT = 3
_RTN_UNICAST = 1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst/src length, tos, table, proto, scope, type, flags


def _attribute(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attribute(kind, struct.pack("=I", value))


class Netlink:
    """One NETLINK_ROUTE socket of the calling thread's network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._sequence = 0

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._sock.close()

    def _request(self, kind: int, flags: int, body: bytes) -> None:
        self._sequence += 1
        header = _HEADER.pack(_HEADER.size + len(body), kind, flags | _NLM_F_REQUEST | _NLM_F_ACK,
                              self._sequence, 0)  # fmt: skip
        self._sock.send(header + body)
        while True:
            reply = self._sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(reply):
                length, reply_kind, _, sequence, _ = _HEADER.unpack_from(reply, offset)
                if reply_kind == _NLMSG_ERROR and sequence == self._sequence:
                    (code,) = struct.unpack_from("=i", reply, offset + _HEADER.size)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return
                offset += max((length + 3) & ~3, _HEADER.size)

    def set_link_up(self, index: int, mtu: int) -> None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, _IFF_UP, _IFF_UP)
        if mtu:
            body += _u32(_IFLA_MTU, mtu)
        self._request(_RTM_NEWLINK, 0, body)

    def set_link_address(self, index: int, mac: str) -> None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        body += _attribute(_IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        self._request(_RTM_NEWLINK, 0, body)

    def add_address(self, index: int, cidr: str) -> None:
        interface = ipaddress.ip_interface(cidr)
        family = socket.AF_INET if interface.version == 4 else socket.AF_INET6
        packed = interface.ip.packed
        body = _IFADDRMSG.pack(family, interface.network.prefixlen, 0, 0, index)
        body += _attribute(_IFA_LOCAL, packed) + _attribute(_IFA_ADDRESS, packed)
        if family == socket.AF_INET6:
            body += _u32(_IFA_FLAGS, _IFA_F_NODAD)
        # REPLACE: a repeated call (after a lost reply) is not an error.
        self._request(_RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_REPLACE, body)

    def add_route(
        self, index: int, destination: str, gateway: str = "", source: str = "", scope: int = 0
    ) -> None:
        network = ipaddress.ip_network(destination, strict=False)
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        body = _RTMSG.pack(family, network.prefixlen, 0, 0, _RT_TABLE_MAIN, _RTPROT_BOOT,
                           scope, _RTN_UNICAST, 0)  # fmt: skip
        if network.prefixlen:
            body += _attribute(_RTA_DST, network.network_address.packed)
        if gateway:
            body += _attribute(_RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        if source:
            body += _attribute(_RTA_PREFSRC, ipaddress.ip_address(source).packed)
        body += _u32(_RTA_OIF, index)
        self._request(_RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_REPLACE, body)


def virtio_nic(sys_class_net: str = "/sys/class/net") -> tuple[str, int] | None:
    """The (name, index) of the VM's one virtio-net NIC, if it has one."""
    for name in sorted(os.listdir(sys_class_net)):
        driver = os.path.realpath(f"{sys_class_net}/{name}/device/driver")
        if os.path.basename(driver) == "virtio_net":
            with open(f"{sys_class_net}/{name}/ifindex") as f:
                return name, int(f.read())
    return None


def link_by_mac(mac: str, sys_class_net: str = "/sys/class/net") -> tuple[str, int]:
    """The (name, index) of the interface whose MAC is `mac`; ENODEV if none."""
    wanted = mac.lower()
    for name in sorted(os.listdir(sys_class_net)):
        try:
            with open(f"{sys_class_net}/{name}/address") as f:
                if f.read().strip().lower() != wanted:
                    continue
            with open(f"{sys_class_net}/{name}/ifindex") as f:
                return name, int(f.read())
        except OSError:
            continue
    raise OSError(errno.ENODEV, f"no network interface has the MAC {mac}")
