"""scripts/bench's pod rows: the kubelet's calls on a private containerd with CRI, our `pyrunc`
handler against containerd's own runc shim (handler `runc`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from cri_client import CriClient

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
