"""scripts/bench's pod rows: the kubelet's calls on a private containerd with CRI, our `pyrunc`
handler against containerd's own runc shim (handler `runc`); and the pod network rows, two pods
of each handler on the CNI bridge (tests/e2e/podnet.py) against two `runc` pods."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cri_client import POD, CriClient

HANDLERS = {"ours": "pyrunc", "go": "runc"}
APP_CONTAINERS = 3  # per pod, for the memory row
SLEEP = ["sleep", "100000"]


def pod_start(cri: CriClient, image: str, handler: str) -> float:
    """Seconds from RunPodSandbox until one app container is RUNNING; the pod is removed
    after the clock stops."""
    started = time.perf_counter()
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, image, SLEEP)
    running = cri.state(container) == 1  # CONTAINER_RUNNING
    elapsed = time.perf_counter() - started
    cri.stop_pod(pod)
    cri.remove_pod(pod)
    if not running:
        raise RuntimeError(f"{handler}: the pod's container is not running")
    return elapsed


@contextmanager
def pods_with_apps(
    cri: CriClient, image: str, handler: str, n: int, apps: int = APP_CONTAINERS
) -> Iterator[None]:
    """n running pods of `apps` sleeping containers each; removed on exit."""
    try:
        for _ in range(n):
            pod = cri.run_pod(handler)
            for _ in range(apps):
                cri.run_container(pod, image, SLEEP)
        yield
    finally:
        cri.remove_all()


# -- pod network ---------------------------------------------------------------------------

NETWORK_HANDLERS = {"ours": "pyrunc", "runsc": "pyrunsc", "kata": "pykata", "go": "runc"}
SINK_PORT, HTTP_PORT, CLOSED_PORT = 5001, 8080, 9
RECEIVED = "/tmp/received"
# busybox: a sink that counts each connection's bytes into RECEIVED, and httpd. The sink is nc,
# which polls before it reads: in runsc's host network mode (pyrunsc's fallback on Linux
# 6.11+) this runsc fails a blocking socket read with EAGAIN (`nc -e wc` would read so). nc's
# stdin is a FIFO nobody writes (on /dev, a tmpfs in every backend: pykata's rootfs is 9p,
# which makes no FIFOs), as an EOF there would end the connection; the count is moved into
# place, as the next listener's redirection would empty it.
NETWORK_SERVER = [
    "sh",
    "-c",
    f"mkfifo /dev/idle && exec 3<>/dev/idle && "
    f"(while :; do nc -l -p {SINK_PORT} <&3 | wc -c > /tmp/n; mv /tmp/n {RECEIVED}; done) & "
    f"mkdir -p /www && echo ok > /www/ok && exec httpd -f -p {HTTP_PORT} -h /www",
]


@dataclass
class PodPair:
    """A server pod and a client pod of one handler on the CNI network."""

    handler: str
    server: str  # the server container's id
    client: str  # the client container's id
    server_ip: str

    def exec_seconds(self, cri: CriClient, script: str) -> tuple[float, bytes]:
        started = time.perf_counter()
        result = cri.exec_sync(self.client, ["sh", "-c", script], timeout=600)
        elapsed = time.perf_counter() - started
        if result.exit_code:
            problem = result.stderr.decode(errors="replace")
            raise RuntimeError(f"{self.handler}: {script!r} failed: {problem}")
        return elapsed, bytes(result.stdout)

    def throughput_mb_s(self, cri: CriClient, mib: int) -> float:
        """MiB/s of one TCP stream client -> server (the exec's own cost taken off)."""
        baseline, _ = self.exec_seconds(cri, "true")
        blocks = mib * 16  # of 64 KiB, a pipe's size
        send = (
            f"dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | nc {self.server_ip} {SINK_PORT}"
        )
        cri.exec_sync(self.server, ["rm", "-f", RECEIVED])
        elapsed, _ = self.exec_seconds(cri, send)
        expected = str(mib * 1024 * 1024).encode()
        counted = [b""]

        def all_counted() -> bool:
            counted[0] = cri.exec_sync(self.server, ["cat", RECEIVED]).stdout.strip()
            return bool(counted[0] == expected)

        deadline = time.monotonic() + 30  # wc writes once nc has ended
        while not all_counted():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.handler}: {counted[0]!r} bytes of {mib} MiB arrived")
            time.sleep(0.2)
        return round(mib / max(elapsed - baseline, 1e-6), 1)

    def request_ms(self, cri: CriClient, count: int) -> float:
        """Milliseconds per TCP connect + HTTP GET + close, client -> server, by nc in a shell
        loop (an exec's own cost taken off; starting nc and printf, which costs each backend
        differently, gVisor's most, is in it)."""
        baseline, _ = self.exec_seconds(cri, "true")
        get = http_get(self.server_ip)
        loop = f"i=0; while [ $i -lt {count} ]; do {get} >/dev/null; i=$((i+1)); done"
        elapsed, _ = self.exec_seconds(cri, loop)
        return round(max(elapsed - baseline, 0.0) / count * 1000, 2)

    def round_trip_ms(self, count: int) -> float:
        """Milliseconds per TCP round trip from the host to the server pod over the bridge: a
        SYN to a closed port, answered by the pod's network stack with a RST. The pod's path
        alone: a connect to httpd would time its accepts (one fork each, a short backlog)."""
        started = time.perf_counter()
        for _ in range(count):
            try:
                socket.create_connection((self.server_ip, CLOSED_PORT), timeout=10).close()
            except ConnectionRefusedError:
                continue
            raise RuntimeError(f"{self.handler}: port {CLOSED_PORT} of the pod is open")
        return round((time.perf_counter() - started) / count * 1000, 3)


def http_get(address: str) -> str:
    """A shell pipeline that GETs the server's page through nc: this runsc's host network mode
    (pyrunsc's fallback on Linux 6.11+) fails wget's blocking read with EAGAIN."""
    return f"printf 'GET /ok HTTP/1.0\\r\\n\\r\\n' | nc {address} {HTTP_PORT}"


@contextmanager
def pod_pair(cri: CriClient, image: str, handler: str) -> Iterator[PodPair]:
    pods = [cri.run_pod(handler, network=POD) for _ in range(2)]
    try:
        server = cri.run_container(pods[0], image, NETWORK_SERVER)
        client = cri.run_container(pods[1], image, SLEEP)
        pair = PodPair(handler, server, client, cri.pod_ip(pods[0]))
        fetch = ["sh", "-c", f"{http_get(pair.server_ip)} | grep -q '^ok'"]
        deadline = time.monotonic() + 60  # httpd listens a moment after StartContainer
        while cri.exec_sync(client, fetch, timeout=30).exit_code:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{handler}: the server pod does not answer")
            time.sleep(0.5)
        yield pair
    finally:
        for pod in pods:
            cri.stop_pod(pod)
            cri.remove_pod(pod)
