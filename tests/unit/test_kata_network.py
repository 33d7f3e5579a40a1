"""pykata's pod network: which netns a VM gets, the QEMU NIC, the guest spec, the agent's
requests, and (as root) the tap and tc plumbing in a scratch netns."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.agent.netlink import link_by_mac
from shim.kata import network
from shim.kata.guestspec import guest_spec
from shim.kata.network import (
    HostNetworkRefused,
    Interface,
    Plumbing,
    Route,
    interface_request,
    ordered_routes,
    route_requests,
    vm_netns,
)
from shim.vm.qemu import Nic, VmConfig, command_line

NETNS = "/var/run/netns/cni-1234"
SANDBOX = {"io.kubernetes.cri.container-type": "sandbox"}


def _spec(
    namespaces: list[dict[str, str]] | None, annotations: dict[str, str] | None = None
) -> Any:
    linux = {} if namespaces is None else {"namespaces": namespaces}
    return {"linux": linux, "annotations": annotations or {}}


def test_a_cri_sandbox_gets_its_netns() -> None:
    spec = _spec([{"type": "pid"}, {"type": "network", "path": NETNS}], SANDBOX)
    assert vm_netns(spec) == NETNS


@pytest.mark.parametrize(
    "namespaces", [None, [{"type": "pid"}], [{"type": "network"}]], ids=["none", "no-net", "new"]
)
def test_a_cri_sandbox_without_a_netns_path_is_refused(namespaces: Any) -> None:
    with pytest.raises(HostNetworkRefused, match="hostNetwork"):
        vm_netns(_spec(namespaces, SANDBOX))


def test_ctr_without_a_netns_path_gets_no_network() -> None:
    assert vm_netns(_spec([{"type": "network"}])) == ""
    assert vm_netns(_spec([])) == ""  # ctr --net-host: the VM has no NIC, as before


def test_command_line_has_a_virtio_nic_on_the_tap_fd(tmp_path: Path) -> None:
    base = VmConfig(tmp_path / "k", tmp_path / "i", "quiet", tmp_path / "c")
    assert command_line(base)[command_line(base).index("-nic") + 1] == "none"
    config = VmConfig(
        tmp_path / "k",
        tmp_path / "i",
        "quiet",
        tmp_path / "c",
        nics=[Nic(3, "aa:bb:cc:00:11:22", 1450)],
    )
    argv = command_line(config)
    assert "-nic" not in argv
    assert argv[argv.index("-netdev") + 1] == "tap,fd=3,id=net0"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-net-pci,netdev=net0,mac=aa:bb:cc:00:11:22,romfile=,host_mtu=1450" in devices


def test_a_nic_without_a_tap_is_on_a_hub_of_its_own(tmp_path: Path) -> None:
    config = VmConfig(
        tmp_path / "k", tmp_path / "i", "", tmp_path / "c", nics=[Nic(None, "02:00:00:00:00:01")]
    )
    argv = command_line(config)
    assert argv[argv.index("-netdev") + 1] == "hubport,hubid=0,id=net0"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01,romfile=" in devices


def test_the_sandbox_stays_in_the_guests_netns_and_the_others_join_it() -> None:
    sandbox = _spec(
        [{"type": "network", "path": NETNS}, {"type": "ipc", "path": "/x/ipc"}], SANDBOX
    )
    guest = guest_spec(sandbox, "pause", vm_pid=42, sandbox_guest_pid=None, vm_netns=NETNS)
    assert guest["linux"]["namespaces"] == [{"type": "ipc"}]
    app = _spec([{"type": "network", "path": "/proc/42/ns/net"}])
    guest = guest_spec(app, "app", vm_pid=42, sandbox_guest_pid=7, vm_netns=NETNS)
    assert guest["linux"]["namespaces"] == [{"type": "network", "path": "/proc/7/ns/net"}]
    # No network for the VM: a netns path is a host file, and the guest gives a fresh netns.
    guest = guest_spec(sandbox, "pause", vm_pid=42, sandbox_guest_pid=None)
    assert guest["linux"]["namespaces"][0] == {"type": "network"}


def test_routes_through_a_gateway_come_after_on_link_ones() -> None:
    routes = [Route("0.0.0.0/0", "198.19.254.1"), Route("198.18.0.0/16", scope=253)]
    assert [r.destination for r in ordered_routes(routes)] == ["198.18.0.0/16", "0.0.0.0/0"]


def test_agent_requests_carry_the_interface_and_routes() -> None:
    interface = Interface("eth0", "aa:bb:cc:00:11:22", 1450, ("198.18.0.5/24", "fd00::5/64"))
    request = interface_request(interface)
    assert (request.mac, request.mtu, request.name) == ("aa:bb:cc:00:11:22", 1450, "eth0")
    assert list(request.addresses) == ["198.18.0.5/24", "fd00::5/64"]
    (route,) = route_requests([Route("0.0.0.0/0", "198.18.0.1", "198.18.0.5")])
    assert (route.destination, route.gateway, route.source, route.scope) == (
        "0.0.0.0/0", "198.18.0.1", "198.18.0.5", 0
    )  # fmt: skip


def test_plumbing_record_round_trips(tmp_path: Path) -> None:
    record = tmp_path / "network.json"
    Plumbing(NETNS).write(record)
    assert Plumbing.read(record) == Plumbing(NETNS, network.TAP_NAME)
    record.write_text("{")
    assert Plumbing.read(record) is None
    assert Plumbing.read(tmp_path / "missing") is None


def test_the_guest_finds_its_nic_by_mac(tmp_path: Path) -> None:
    for name, mac, index in (("lo", "00:00:00:00:00:00", 1), ("eth0", "aa:bb:cc:00:11:22", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
        (tmp_path / name / "ifindex").write_text(f"{index}\n")
    assert link_by_mac("AA:BB:CC:00:11:22", str(tmp_path)) == ("eth0", 2)
    with pytest.raises(OSError, match="no network interface"):
        link_by_mac("aa:bb:cc:00:11:23", str(tmp_path))


# -- as root: a scratch netns with a veth, as CNI leaves it --------------------------------


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


_netns_count = itertools.count()


@pytest.fixture
def pod_netns() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root, ip and /dev/net/tun")
    suffix = f"{os.getpid()}-{next(_netns_count)}"
    name = f"pyshim-unit-{suffix}"
    _ip("netns", "add", name)
    try:
        # The host end goes when the netns does, with its peer (asynchronously: a fresh name).
        _ip("link", "add", f"pyu{suffix}"[:15], "type", "veth", "peer", "eth0", "netns", name)
        _ip("-n", name, "addr", "add", "198.19.254.5/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "mtu", "1450", "up")
        _ip("-n", name, "route", "add", "default", "via", "198.19.254.1")
        yield name
    finally:
        _ip("netns", "del", name)


def test_plumb_joins_a_tap_to_the_veth_and_unplumb_removes_it(pod_netns: str) -> None:
    plumbing = Plumbing(f"/var/run/netns/{pod_netns}")
    plumbed = network.plumb(plumbing)
    try:
        interface = plumbed.network.interface
        assert interface is not None
        assert (interface.name, interface.mtu, interface.addresses) == (
            "eth0", 1450, ("198.19.254.5/24",)
        )  # fmt: skip
        assert plumbed.network.routes == (Route("0.0.0.0/0", "198.19.254.1"),)
        assert "mtu 1450" in _ip("-n", pod_netns, "link", "show", network.TAP_NAME)
        for device, target in (("eth0", network.TAP_NAME), (network.TAP_NAME, "eth0")):
            filters = subprocess.run(
                ["tc", "-n", pod_netns, "filter", "show", "dev", device, "ingress"],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            assert f"Egress Redirect to device {target}" in filters
    finally:
        os.close(plumbed.tap_fd)
    network.unplumb(plumbing)
    assert network.TAP_NAME not in _ip("-n", pod_netns, "link")
    qdiscs = subprocess.run(
        ["tc", "-n", pod_netns, "qdisc", "show"], check=True, capture_output=True, text=True
    ).stdout
    assert "ingress" not in qdiscs


def test_a_netns_with_only_loopback_gives_no_nic(pod_netns: str) -> None:
    _ip("-n", pod_netns, "link", "del", "eth0")
    plumbed = network.plumb(Plumbing(f"/var/run/netns/{pod_netns}"))
    assert plumbed.network.interface is None and plumbed.tap_fd == -1


def test_unplumb_of_a_gone_netns_does_nothing(tmp_path: Path) -> None:
    network.unplumb(Plumbing(str(tmp_path / "gone")))
    (tmp_path / "file").touch()  # what a netns path is once unmounted
    network.unplumb(Plumbing(str(tmp_path / "file")))


def test_net_sysctls_of_a_container_in_the_agents_netns_are_taken_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shim.agent import network as agent_network

    written: dict[str, str] = {}

    class Sysctl:
        def __init__(self, path: str, mode: str) -> None:
            self.path = path

        def __enter__(self) -> Sysctl:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def write(self, value: str) -> None:
            written[self.path] = value

    monkeypatch.setattr(agent_network, "open", Sysctl, raising=False)
    sysctls = {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"}
    fresh = {"linux": {"namespaces": [{"type": "network"}], "sysctl": dict(sysctls)}}
    agent_network.take_root_netns_sysctls(fresh)
    assert fresh["linux"]["sysctl"] == sysctls and not written  # runc sets them in its netns
    own = {"linux": {"namespaces": [{"type": "pid"}], "sysctl": dict(sysctls)}}
    agent_network.take_root_netns_sysctls(own)
    assert own["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}
    assert written == {"/proc/sys/net/ipv4/ip_unprivileged_port_start": "0"}
