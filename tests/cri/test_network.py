"""Pods on a real CNI network (the session's bridge, tests/e2e/podnet.py), per handler, with
containerd's `runc` as the reference: the pod's address as CRI reports it and as its container
sees it, TCP between pods and from the host, the PodSandboxConfig's hostname and DNS settings,
and nothing of the network left once the pod is removed.

The Linux handlers serve with busybox httpd and fetch with wget. A WASI module has no sockets,
so a pywasm pod shows its network by its netns (the module runs in the pause's) and by the
pod's kernel answering: a connection to a closed port of the pod is refused at once.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as api
from cri_client import POD, CriClient, Pod
from harness import PrivateContainerd, wait_until
from podnet import unusable_reason
from runsc_support import require_runsc
from vm_support import require_vm

pytestmark = pytest.mark.timeout(300)

HANDLERS = ["pyrunc", "pyrunsc", "pywasm", "pykata", "runc"]
SOCKET_HANDLERS = [h for h in HANDLERS if h != "pywasm"]  # whose containers can serve TCP
assert SOCKET_HANDLERS[-1] == "runc"
PORT = 8080
DNS = api.DNSConfig(
    servers=["198.18.255.53"], searches=["pods.test", "svc.pods.test"], options=["ndots:3"]
)


def usable(handler: str) -> str:
    reason = unusable_reason()
    if reason:
        pytest.fail(reason)  # setup installs the plugins: their absence is a broken setup
    if handler == "pyrunsc":
        require_runsc()
    if handler == "pykata":
        require_vm()
    return handler


@pytest.fixture(params=HANDLERS)
def handler(request: pytest.FixtureRequest) -> str:
    return usable(str(request.param))


# Two pods of each handler, and one of each with a `runc` pod.
POD_PAIRS = [(h, h) for h in SOCKET_HANDLERS] + [(h, "runc") for h in SOCKET_HANDLERS[:-1]]


def pod_on_network(cri: CriClient, handler: str, hostname: str = "") -> Pod:
    return cri.run_pod(handler, network=POD, hostname=hostname, dns=DNS)


def serve_hostname(cri: CriClient, pod: Pod, image: str) -> str:
    """A container of the pod that answers HTTP on PORT with its hostname; its id."""
    script = (
        f"mkdir -p /tmp/www && hostname > /tmp/www/index.html && "
        f"exec httpd -f -p {PORT} -h /tmp/www"
    )
    return cri.run_container(pod, image, ["sh", "-c", script], name="web")


class Unanswered(OSError):
    """A fetch that got no HTTP answer (the client's error message)."""


def fetch_in(cri: CriClient, container_id: str, address: str) -> str:
    """The body a container gets for GET / from address:PORT. Through nc, not wget: in runsc's
    host network mode (pyrunsc's fallback on this kernel) a blocking read of this runsc may
    fail with EAGAIN, which ends wget; nc polls before it reads. (This busybox's wget also
    crashes with -T.)"""
    request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {address} {PORT}"
    result = cri.exec_sync(container_id, ["sh", "-c", request], timeout=30)
    head, blank, body = result.stdout.decode(errors="replace").partition("\r\n\r\n")
    if result.exit_code or not blank:
        raise Unanswered(result.stderr.decode(errors="replace").strip() or head)
    return body.strip()


def fetch_from_host(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}:{PORT}/", timeout=10) as response:
        return bytes(response.read()).decode().strip()


def until_served(fetch: Callable[[], str]) -> str:
    """The answer once the server listens (httpd starts a moment after StartContainer)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return fetch()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_pod_gets_an_address_its_container_sees_with_hostname_and_dns(
    containerd: PrivateContainerd, cri: CriClient, handler: str, request: pytest.FixtureRequest
) -> None:
    network = containerd.pod_network
    assert network is not None
    pod = pod_on_network(cri, handler, hostname="netpod")
    ip = cri.pod_ip(pod)
    assert ipaddress.IPv4Address(ip) in network.subnet
    assert len(network.ports()) == 1  # the pod's veth on the session's bridge
    if handler == "pywasm":
        seen = module_view(cri, pod, request.getfixturevalue("wasm_image"))
    else:
        container = cri.run_container(pod, containerd.image, ["sleep", "100000"])
        script = "hostname; cat /etc/resolv.conf; ip -o -4 addr show"
        seen = cri.exec_sync(container, ["sh", "-c", script]).stdout.decode()
    hostname, *rest = seen.splitlines()
    assert hostname == "netpod"
    resolv = "\n".join(rest)
    assert "nameserver 198.18.255.53" in resolv
    assert "search pods.test svc.pods.test" in resolv
    assert "options ndots:3" in resolv
    if handler != "pywasm":
        assert f"inet {ip}/{network.subnet.prefixlen}" in resolv  # the `ip addr` lines


def module_view(cri: CriClient, pod: Pod, image: str) -> str:
    """What a module of the pod reads of its hostname and resolv.conf (CRI's bind mounts)."""
    container = cri.run_container(pod, image, ["/cat.wasm", "/etc/hostname", "/etc/resolv.conf"])
    cri.wait_exited(container)
    return "\n".join(message for _stream, _tag, message in cri.log_lines(pod, container))


@pytest.mark.parametrize(("first", "second"), POD_PAIRS)
def test_pods_talk_tcp_by_pod_ip_and_the_host_reaches_them(
    containerd: PrivateContainerd, cri: CriClient, first: str, second: str
) -> None:
    """Two pods fetch from each other by pod IP, and the host fetches from both over the
    bridge."""
    pods = [pod_on_network(cri, usable(first), "one"), pod_on_network(cri, usable(second), "two")]
    servers = [serve_hostname(cri, pod, containerd.image) for pod in pods]
    ips = [cri.pod_ip(pod) for pod in pods]
    assert ips[0] != ips[1]
    assert until_served(lambda: fetch_from_host(ips[0])) == "one"
    assert until_served(lambda: fetch_from_host(ips[1])) == "two"
    assert until_served(lambda: fetch_in(cri, servers[0], ips[1])) == "two"
    assert until_served(lambda: fetch_in(cri, servers[1], ips[0])) == "one"


def test_wasm_pod_is_on_the_network(
    containerd: PrivateContainerd, cri: CriClient, wasm_image: str
) -> None:
    """The module runs in the pod's netns, whose kernel answers for the pod's IP: a runc pod's
    connection to a closed port there is refused (no timeout), and so is the host's."""
    pod = pod_on_network(cri, "pywasm")
    module = cri.run_container(pod, wasm_image, ["/sleep.wasm"])
    pause_netns = cri.namespace_paths(pod, "network")[0]
    module_pid = json.loads(cri.container_status(module).info["info"])["pid"]
    ip = cri.pod_ip(pod)
    assert os.stat(f"/proc/{module_pid}/ns/net").st_ino == os.stat(pause_netns).st_ino
    with pytest.raises(ConnectionRefusedError), socket.create_connection((ip, PORT), timeout=10):
        pass
    peer = pod_on_network(cri, "runc")
    client = cri.run_container(peer, containerd.image, ["sleep", "100000"])
    with pytest.raises(Unanswered, match="refused"):
        fetch_in(cri, client, ip)


def test_removal_leaves_nothing_of_the_network(
    containerd: PrivateContainerd, cri: CriClient, handler: str
) -> None:
    network = containerd.pod_network
    assert network is not None
    pod = pod_on_network(cri, handler)
    netns = cri.namespace_paths(pod, "network")
    assert netns and all(p.exists() for p in netns)
    assert network.ports() and network.leases()
    cri.stop_pod(pod)
    cri.remove_pod(pod)
    assert not [p for p in netns if p.exists()]
    assert wait_until(lambda: not network.leftovers(), timeout=10)
    assert not Path(f"/run/netns/{netns[0].name}").exists()
