"""What Kubernetes' conformance asks of a container's security settings, for gVisor pods
(`pyrunsc`) against containerd's `runc` as the reference (issue 24): privileged containers and
`capabilities: add: [ALL]` start with every capability, seccomp profiles (the runtime's default
and a localhost one) are enforced, `readonlyPaths` are read-only, `maskedPaths` hidden, and a
read-only volume leaves the host mounts below it as they are. Where gVisor differs by nature
(an exec's seccomp on runsc releases before 2026-03-30, a hostNetwork pod's /proc/net/tcp), the
tests show exactly how, with runc beside it."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as api
from cri_client import NODE, POD, CriClient, Pod
from harness import PrivateContainerd, detach_mounts, wait_until
from podnet import unusable_reason
from runsc_support import require_runsc

from shim.runtimes.runsc import EXEC_SECCOMP_RELEASE, release_date

pytestmark = pytest.mark.timeout(300)

HANDLERS = ["pyrunsc", "runc"]
SLEEP = ["sleep", "100000"]
CAP_SYS_ADMIN = 21
EPERM_TEXTS = ("Operation not permitted", "you must be root")
Profile = api.SecurityProfile.ProfileType


@pytest.fixture(params=HANDLERS)
def handler(request: pytest.FixtureRequest) -> str:
    if request.param == "pyrunsc":
        require_runsc()
    return str(request.param)


@pytest.fixture
def image(containerd: PrivateContainerd) -> str:
    return str(containerd.image)


def effective_capabilities(cri: CriClient, container_id: str, pid: str) -> int:
    result = cri.exec_sync(container_id, ["cat", f"/proc/{pid}/status"])
    assert result.exit_code == 0, result
    for line in result.stdout.decode().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff in /proc/{pid}/status: {result.stdout!r}")


def assert_all_capabilities(cri: CriClient, container_id: str) -> None:
    # The init's (pid 1 of the container's pid namespace) and an exec's own.
    for pid in ("1", "self"):
        caps = effective_capabilities(cri, container_id, pid)
        assert caps & (1 << CAP_SYS_ADMIN), f"/proc/{pid}: CapEff {caps:#x} lacks CAP_SYS_ADMIN"


def test_a_privileged_container_has_every_capability(
    cri: CriClient, handler: str, image: str
) -> None:
    pod = cri.run_pod(handler, privileged=True)
    container = cri.run_container(pod, image, SLEEP, privileged=True)
    assert_all_capabilities(cri, container)


def test_capabilities_add_all_gives_every_capability(
    cri: CriClient, handler: str, image: str
) -> None:
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, image, SLEEP, capabilities=["ALL"])
    assert_all_capabilities(cri, container)


def own_uts_pod(cri: CriClient, handler: str) -> Pod:
    """A pod on the session's CNI network: its UTS namespace is its own (a hostNetwork pod
    shares the node's, whose hostname a runc container that may call sethostname changes)."""
    reason = unusable_reason()
    if reason:
        pytest.fail(reason)
    return cri.run_pod(handler, network=POD)


def assert_refused(cri: CriClient, pod: Pod, container_id: str, what: str) -> None:
    """The container's command failed with EPERM (busybox's words for it)."""
    status = cri.wait_exited(container_id)
    output = " ".join(message for _, _, message in cri.log_lines(pod, container_id))
    assert status.exit_code != 0, f"{what} was let through: {output}"
    assert any(text in output for text in EPERM_TEXTS), output


def assert_allowed(cri: CriClient, container_id: str) -> None:
    assert cri.wait_exited(container_id).exit_code == 0


def test_a_localhost_seccomp_profile_is_enforced(
    cri: CriClient, handler: str, image: str, tmp_path: Path
) -> None:
    """A profile that refuses sethostname alone, in a container whose capabilities allow it.
    The container's own processes (gVisor's execs do not get its seccomp: see the README)."""
    profile = tmp_path / "no-sethostname.json"
    rule = {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}))
    seccomp = api.SecurityProfile(profile_type=Profile.Localhost, localhost_ref=str(profile))
    pod = own_uts_pod(cri, handler)
    command = ["hostname", "renamed"]
    confined = cri.run_container(pod, image, command, capabilities=["SYS_ADMIN"], seccomp=seccomp)
    free = cri.run_container(pod, image, command, capabilities=["SYS_ADMIN"])

    assert_refused(cri, pod, confined, "sethostname")
    assert_allowed(cri, free)  # what the profile alone forbids


def test_the_runtime_default_seccomp_profile_is_enforced(
    cri: CriClient, handler: str, image: str
) -> None:
    """containerd's default profile allows unshare(2) only with CAP_SYS_ADMIN; a new user
    namespace needs no capability, so only seccomp stops it."""
    seccomp = api.SecurityProfile(profile_type=Profile.RuntimeDefault)
    pod = cri.run_pod(handler)
    command = ["unshare", "-U", "true"]
    confined = cri.run_container(pod, image, command, seccomp=seccomp)
    free = cri.run_container(pod, image, command)

    assert_refused(cri, pod, confined, "unshare")
    assert_allowed(cri, free)


def test_readonly_paths_are_read_only(cri: CriClient, handler: str, image: str) -> None:
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, image, SLEEP, readonly_paths=["/tmp", "/no/such/path"])

    written = cri.exec_sync(container, ["touch", "/tmp/written"])
    output = (written.stdout + written.stderr).decode(errors="replace")
    assert written.exit_code != 0, "a readonlyPath was writable"
    assert "Read-only file system" in output, output
    # Only the path: the rest of the rootfs stays writable.
    assert cri.exec_sync(container, ["touch", "/written"]).exit_code == 0


def test_masked_paths_are_hidden(cri: CriClient, handler: str, image: str) -> None:
    pod = cri.run_pod(handler)
    masked = ["/etc/group", "/root", "/proc/kcore", "/no/such/path"]
    container = cri.run_container(pod, image, SLEEP, masked_paths=masked)

    group = cri.exec_sync(container, ["cat", "/etc/group"])
    assert (group.exit_code, group.stdout) == (0, b""), group  # empty, as /dev/null reads
    root = cri.exec_sync(container, ["ls", "-A", "/root"])
    assert (root.exit_code, root.stdout) == (0, b""), root
    written = cri.exec_sync(container, ["touch", "/root/written"])
    assert b"Read-only file system" in written.stderr, written
    # What is not masked stays as it was.
    assert cri.exec_sync(container, ["grep", "-q", "root", "/etc/passwd"]).exit_code == 0


def test_a_read_only_volume_is_read_only_only_at_its_own_mount(
    cri: CriClient, handler: str, image: str, tmp_path: Path
) -> None:
    """critest's non-recursive read-only mount: runc remounts the volume's top mount only, so
    a host tmpfs below it stays writable; runsc would serve it read-only with the volume."""
    volume = tmp_path / "volume"
    (volume / "tmpfs").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", volume / "tmpfs"], check=True)
    try:
        pod = cri.run_pod(handler)
        mounts = [api.Mount(container_path="/vol", host_path=str(volume), readonly=True)]
        container = cri.run_container(pod, image, SLEEP, mounts=mounts)
        top = cri.exec_sync(container, ["touch", "/vol/written"])
        assert b"Read-only file system" in top.stderr, top
        below = cri.exec_sync(container, ["touch", "/vol/tmpfs/written"])
        assert below.exit_code == 0, below
        assert (volume / "tmpfs" / "written").exists()
    finally:
        cri.remove_all()  # before the host's tmpfs goes
        detach_mounts([volume / "tmpfs"])


def seccomp_mode(cri: CriClient, container_id: str, pid: str) -> int:
    """The Seccomp field of /proc/<pid>/status seen in the container (2: a filter)."""
    result = cri.exec_sync(container_id, ["grep", "^Seccomp:", f"/proc/{pid}/status"])
    assert result.exit_code == 0, result
    return int(result.stdout.split()[1])


def runsc_release() -> int:
    """The date of the node's runsc release; 0 for a build that names none."""
    version = subprocess.run(
        ["runsc", "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return release_date(version) or 0


def test_an_exec_gets_the_containers_seccomp_profile_where_runsc_applies_it(
    cri: CriClient, handler: str, image: str
) -> None:
    """critest's seccomp specs look through ExecSync (`grep Seccomp /proc/self/status`,
    `chmod`, `hostname`). runc confines an exec with the container's profile; runsc does only
    from release-20260330.0 on, so on older ones (Debian 12's) the container's own processes
    are confined and its execs are not."""
    seccomp = api.SecurityProfile(profile_type=Profile.RuntimeDefault)
    pod = cri.run_pod(handler)
    container = cri.run_container(pod, image, SLEEP, seccomp=seccomp)

    assert seccomp_mode(cri, container, "1") == 2, "the container's own process is confined"
    confines_execs = handler != "pyrunsc" or runsc_release() >= EXEC_SECCOMP_RELEASE
    assert seccomp_mode(cri, container, "self") == (2 if confines_execs else 0)


@pytest.fixture
def node_port() -> Iterator[int]:
    """A TCP port the node listens on at every address, answering "hello", as critest's
    "HostNetwork is true" makes one."""
    if socket.has_dualstack_ipv6():
        server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
        server = socket.create_server(("", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # shut down
                return
            with connection:
                connection.sendall(b"hello\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept, which close alone does not
        server.close()
        thread.join(timeout=10)


def listening(cri: CriClient, container_id: str, port: int) -> bool:
    """Whether `netstat -ln` in the container (its /proc/net/tcp and tcp6) lists the port."""
    result = cri.exec_sync(container_id, ["netstat", "-lnt"])
    assert result.exit_code == 0, result
    return re.search(rf":{port}\s", result.stdout.decode()) is not None


def test_a_host_network_pod_reaches_the_nodes_port_and_lists_its_own_sockets(
    cri: CriClient, handler: str, image: str, node_port: int
) -> None:
    """hostNetwork: the container connects to a port the node listens on in both. Its
    `netstat -ln` (critest's check) lists that port on runc, whose /proc/net/tcp is the host
    kernel's; gVisor's /proc/net/tcp lists the sandbox's own sockets only, with runsc
    network=host too (the README's per-backend table), so there only the container's own."""
    pod = cri.run_pod(handler, network=NODE)
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port for the container
        own_port = probe.getsockname()[1]
    container = cri.run_container(pod, image, ["nc", "-l", "-p", str(own_port)])

    reply = cri.exec_sync(container, ["nc", "-w", "10", "127.0.0.1", str(node_port)])
    assert reply.stdout == b"hello\n", reply
    assert wait_until(lambda: listening(cri, container, own_port), timeout=30)
    assert listening(cri, container, node_port) == (handler != "pyrunsc")
