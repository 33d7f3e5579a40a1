"""scripts/bench's pod rows: the kubelet's calls on a private containerd with CRI, our `pyrunc`
handler against containerd's own runc shim (handler `runc`); and the pod network rows, two pods
of each handler on the CNI bridge (tests/e2e/podnet.py) against two `runc` pods."""

from __future__ import annotations

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
def pods_with_apps(cri: CriClient, image: str, handler: str, n: int) -> Iterator[None]:
    """n running pods of APP_CONTAINERS sleeping containers each; removed on exit."""
    try:
        for _ in range(n):
            pod = cri.run_pod(handler)
            for _ in range(APP_CONTAINERS):
                cri.run_container(pod, image, SLEEP)
        yield
    finally:
        cri.remove_all()


# -- pod network ---------------------------------------------------------------------------

NETWORK_HANDLERS = {"ours": "pyrunc", "runsc": "pyrunsc", "kata": "pykata", "go": "runc"}
SINK_PORT, HTTP_PORT = 5001, 8080
# busybox: a sink that answers with the byte count once the sender half-closes, and httpd.
NETWORK_SERVER = [
    "sh",
    "-c",
    f"nc -ll -p {SINK_PORT} -e wc -c & mkdir -p /www && echo ok > /www/ok && "
    f"exec httpd -f -p {HTTP_PORT} -h /www",
]


@dataclass
class PodPair:
    """A server pod and a client pod of one handler on the CNI network."""

    client: str  # the client container's id
    server_ip: str

    def exec_seconds(self, cri: CriClient, script: str) -> tuple[float, bytes]:
        started = time.perf_counter()
        result = cri.exec_sync(self.client, ["sh", "-c", script], timeout=600)
        elapsed = time.perf_counter() - started
        if result.exit_code:
            raise RuntimeError(f"{script!r} failed: {result.stderr.decode(errors='replace')}")
        return elapsed, bytes(result.stdout)

    def throughput_mb_s(self, cri: CriClient, mib: int) -> float:
        """MiB/s of one TCP stream client -> server (the exec's own cost taken off)."""
        baseline, _ = self.exec_seconds(cri, "true")
        send = (
            f"dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null | nc {self.server_ip} {SINK_PORT}"
        )
        elapsed, received = self.exec_seconds(cri, send)
        if int(received or b"0") != mib * 1024 * 1024:
            raise RuntimeError(f"the server counted {received!r} bytes of {mib} MiB")
        return round(mib / max(elapsed - baseline, 1e-6), 1)

    def request_ms(self, cri: CriClient, count: int) -> float:
        """Milliseconds per TCP connect + HTTP GET + close, client -> server."""
        baseline, _ = self.exec_seconds(cri, "true")
        url = f"http://{self.server_ip}:{HTTP_PORT}/ok"
        loop = f"i=0; while [ $i -lt {count} ]; do wget -q -O /dev/null {url}; i=$((i+1)); done"
        elapsed, _ = self.exec_seconds(cri, loop)
        return round(max(elapsed - baseline, 0.0) / count * 1000, 2)


@contextmanager
def pod_pair(cri: CriClient, image: str, handler: str) -> Iterator[PodPair]:
    pods = [cri.run_pod(handler, network=POD) for _ in range(2)]
    try:
        cri.run_container(pods[0], image, NETWORK_SERVER)
        client = cri.run_container(pods[1], image, SLEEP)
        pair = PodPair(client, cri.pod_ip(pods[0]))
        fetch = ["wget", "-q", "-O", "/dev/null", f"http://{pair.server_ip}:{HTTP_PORT}/ok"]
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
