"""pykata's network model (Kata's tcfilter) beyond the shared network tests: a hostNetwork pod
is refused, a VM given a netns of ours (ctr --with-ns) gets its interface and leaves neither
tap nor qdisc in it (after a clean removal and after a killed shim), and a netns with only
loopback gives a VM with no NIC. Our netns outlives the VM, so what the shim leaves there is
seen (CRI removes a pod's netns right after its sandbox stops)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator

import grpc
import pytest
from cri_client import NODE, CriClient
from harness import PrivateContainerd, wait_until
from vm_support import require_vm

from shim.kata.network import TAP_NAME

pytestmark = pytest.mark.timeout(600)

RUNTIME = "io.containerd.pykata.v1"
BOOT = 240  # seconds for a ctr command that boots a VM, on a busy 2-core machine
ADDRESS = "198.19.255.5/24"  # the benchmarking range, only inside our netns: no host route
GATEWAY = "198.19.255.1"


@pytest.fixture(scope="module", autouse=True)
def vm_capable() -> None:
    require_vm()


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def tc(netns: str, *args: str) -> str:
    return subprocess.run(
        ["tc", "-n", netns, *args], check=True, capture_output=True, text=True
    ).stdout


_made = itertools.count()


@pytest.fixture
def netns() -> Iterator[str]:
    """A netns as CNI leaves one: a veth `eth0` (its peer in the host's netns, with no
    address) with an address and a default route; its name."""
    suffix = f"{os.getpid()}-{next(_made)}"
    name = f"pyshim-kata-{suffix}"
    host_end = f"pyk{suffix}"[:15]  # a fresh name: a deleted netns's veth goes asynchronously
    ip("netns", "add", name)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "eth0", "netns", name)
        ip("-n", name, "addr", "add", ADDRESS, "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "mtu", "1400", "up")
        ip("-n", name, "route", "add", "default", "via", GATEWAY)
        yield name
    finally:
        ip("netns", "del", name)


def left_in(netns: str) -> list[str]:
    """Our tap, or any ingress qdisc, in the netns."""
    left = [f"link {TAP_NAME}"] if TAP_NAME in ip("-n", netns, "-o", "link") else []
    return left + [line for line in tc(netns, "qdisc", "show").splitlines() if "ingress" in line]


def test_a_host_network_pod_is_refused(cri: CriClient) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        cri.run_pod("pykata", network=NODE)
    assert "hostNetwork" in str(refused.value.details())


def test_a_vm_in_our_netns_has_its_interface_and_leaves_nothing(
    containerd: PrivateContainerd, netns: str
) -> None:
    script = "ip -o -4 addr show; ip -o link show; ip route"
    out = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--with-ns", f"network:/var/run/netns/{netns}",
        containerd.image, f"net-{os.getpid()}", "sh", "-c", script, timeout=BOOT,
    ).stdout  # fmt: skip
    assert f"inet {ADDRESS}" in out
    assert "mtu 1400" in out
    assert f"default via {GATEWAY}" in out
    assert left_in(netns) == []


def test_a_killed_shim_leaves_nothing_in_the_netns(
    containerd: PrivateContainerd, netns: str
) -> None:
    name = f"netkill-{os.getpid()}"
    containerd.ctr(
        "run", "-d", "--runtime", RUNTIME, "--with-ns", f"network:/var/run/netns/{netns}",
        containerd.image, name, "sleep", "1000", timeout=BOOT,
    )  # fmt: skip
    try:
        assert len(left_in(netns)) == 3  # the tap and two ingress qdiscs
        for shim in containerd.shim_pids():
            os.kill(shim, signal.SIGKILL)
        # containerd sees the shim go and runs `delete`, which unplumbs from the VM's record.
        assert wait_until(lambda: containerd.task_status(name) in ("STOPPED", "absent"), 30)
        assert wait_until(lambda: not left_in(netns), 15), left_in(netns)
    finally:
        containerd.kill_and_delete(name, check=False)
        for fifo_dir in containerd.fifo_dir.iterdir():  # ctr's, removed at a `tasks delete`
            shutil.rmtree(fifo_dir)


def test_a_netns_with_only_loopback_gives_a_vm_without_a_nic(
    containerd: PrivateContainerd, netns: str
) -> None:
    ip("-n", netns, "link", "del", "eth0")
    out = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--with-ns", f"network:/var/run/netns/{netns}",
        containerd.image, f"nonic-{os.getpid()}", "ip", "-o", "link", "show", timeout=BOOT,
    ).stdout  # fmt: skip
    assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
    assert left_in(netns) == []
