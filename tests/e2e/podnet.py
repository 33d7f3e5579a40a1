"""The tests' container networks: for CRI one CNI `bridge` network per test session, as a node's
CNI configuration gives the kubelet's pods theirs (Debian's containernetworking-plugins), and
for Docker a bridge that dockerd's default network uses.

Everything stays on this machine: the subnet is in 198.18.0.0/15 (the benchmarking range), the
bridge holds the gateway address so that the host reaches its pods, and the pods get no route
beyond that subnet (no default route, no masquerading, no port mappings). Standard library only,
like the harness.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
BENCHMARK_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
SYS_NET = Path("/sys/class/net")
IPAM_BOOKKEEPING = {"lock", "last_reserved_ip.0"}  # host-local's files that are not leases


def unusable_reason() -> str | None:
    """Why pods cannot get a CNI network here, or None if they can."""
    missing = [p for p in ("bridge", "host-local", "loopback") if not (CNI_BIN_DIR / p).is_file()]
    if missing:
        return f"CNI plugins missing from {CNI_BIN_DIR}: {', '.join(missing)} (scripts/setup)"
    return None


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 destinations of the host's routes (/proc/net/route: little-endian hex)."""
    networks = []
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        destination = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
        networks.append(ipaddress.IPv4Network(f"{destination}/{mask}", strict=False))
    return networks


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of the benchmarking range that no route of this host uses yet (another session's
    network included), the first tried chosen by this process's pid."""
    taken = [n for n in _routed_networks() if n.prefixlen > 0]
    subnets = list(BENCHMARK_RANGE.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(n) for n in taken):
            return subnet
    raise RuntimeError(f"every /24 of {BENCHMARK_RANGE} is routed on this host")


def bridge_ports(bridge: str) -> list[str]:
    """The interfaces on a bridge (a container's host-side veth each)."""
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.listdir(SYS_NET / bridge / "brif"))
    return []


def delete_link(name: str) -> None:
    if (SYS_NET / name).exists():
        subprocess.run(["ip", "link", "delete", name], check=False, timeout=30)


@dataclass(frozen=True)
class HostBridge:
    """A bridge the host holds the first address of, for dockerd's default network (`bridge`
    in daemon.json: dockerd uses a bridge that exists, with its address)."""

    name: str
    subnet: ipaddress.IPv4Network

    @classmethod
    def for_session(cls, prefix: str) -> HostBridge:
        return cls(f"{prefix}{os.getpid() % 100000}", free_subnet())

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    def create(self) -> None:
        """The bridge, up, with the gateway address (kept if it exists: a dockerd restart)."""
        if (SYS_NET / self.name).exists():
            return
        gateway = f"{self.gateway}/{self.subnet.prefixlen}"
        for argv in (
            ["ip", "link", "add", self.name, "type", "bridge"],
            ["ip", "addr", "add", gateway, "dev", self.name],
            ["ip", "link", "set", self.name, "up"],
        ):
            subprocess.run(argv, check=True, timeout=30, capture_output=True)

    def leftovers(self) -> list[str]:
        return [f"veth {p} on {self.name}" for p in bridge_ports(self.name)]

    def force_clean(self) -> None:
        for port in bridge_ports(self.name):
            delete_link(port)

    def remove(self) -> None:
        delete_link(self.name)


@dataclass(frozen=True)
class PodNetwork:
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    ipam_dir: Path  # host-local's leases, one file per address in use

    @classmethod
    def for_session(cls, base: Path) -> PodNetwork:
        """A bridge named after this process, on a free /24."""
        suffix = os.getpid() % 100000
        return cls(f"pyshim-{suffix}", f"pyshim{suffix}", free_subnet(), base / "cni-ipam")

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's own address: the host's side of the pod network."""
        return self.subnet.network_address + 1

    def conflist(self) -> dict[str, object]:
        return {
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,  # the bridge gets the gateway address: the host's way in
                    "isDefaultGateway": False,  # no default route: nothing leaves the subnet
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet), "gateway": str(self.gateway)}]],
                        "dataDir": str(self.ipam_dir),
                    },
                }
            ],
        }

    def install(self, conf_dir: Path) -> str:
        """Write the network's configuration for containerd; returns the ip_forward setting to
        put back afterwards (the bridge plugin turns forwarding on host-wide)."""
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-pyshim.conflist").write_text(json.dumps(self.conflist(), indent=2))
        return IP_FORWARD.read_text().strip()

    def ports(self) -> list[str]:
        """One host-side veth per pod on the network."""
        return bridge_ports(self.bridge)

    def leases(self) -> list[str]:
        """The addresses host-local still has handed out."""
        with contextlib.suppress(FileNotFoundError):
            files = os.listdir(self.ipam_dir / self.name)
            return sorted(set(files) - IPAM_BOOKKEEPING)
        return []

    def leftovers(self) -> list[str]:
        return [f"veth {p} on {self.bridge}" for p in self.ports()] + [
            f"address {a} still leased" for a in self.leases()
        ]

    def force_clean(self) -> None:
        """Take back what a failed pod removal left: its veth and its lease."""
        for port in self.ports():
            delete_link(port)
        for address in self.leases():
            (self.ipam_dir / self.name / address).unlink(missing_ok=True)

    def remove(self, ip_forward: str) -> None:
        """Delete the bridge (the plugin leaves it for the next pod) and put forwarding back."""
        delete_link(self.bridge)
        if ip_forward:
            IP_FORWARD.write_text(ip_forward)
