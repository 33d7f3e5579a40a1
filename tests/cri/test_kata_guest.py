"""What a pykata guest is made of, seen from inside: its own image, no host directory but the
pod's shared one, and, for VMs restored from one template, an identity of its own.

A privileged container in the node's (here: the guest's) PID namespace sees the guest's init:
its mount table (/proc/1/mountinfo) and its root (/proc/1/root).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cri_client import NODE, CriClient, Pod
from harness import PrivateContainerd
from vm_support import cold_boot_reasons, require_vm, vm_starts

from shim.kata.guestspec import SHARED_IN_GUEST

pytestmark = pytest.mark.timeout(600)

HANDLER = "pykata"
# Files every Debian host with containerd and QEMU has in /usr; no guest image holds them.
HOST_USR_PROBES = ("/usr/bin/containerd", "/usr/bin/qemu-system-x86_64", "/usr/bin/apt-get")
IDENTITY = (
    "cat /proc/1/root/etc/machine-id; cat /proc/sys/kernel/random/boot_id;"
    " head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
    " for d in /sys/class/net/*; do [ -e $d/device ] && cat $d/address; done; true"
)


@pytest.fixture(scope="module", autouse=True)
def vm_capable() -> None:
    require_vm()


def guest_pod(cri: CriClient, image: str) -> tuple[Pod, str]:
    """A pod whose privileged container shares the guest's PID namespace; its id."""
    pod = cri.run_pod(HANDLER, pid_mode=NODE, privileged=True)
    container = cri.run_container(pod, image, ["sleep", "600"], privileged=True)
    return pod, container


def run(cri: CriClient, container: str, script: str) -> str:
    result = cri.exec_sync(container, ["sh", "-c", script], timeout=60)
    assert result.exit_code == 0, result.stderr
    return str(result.stdout.decode())


def test_the_guest_sees_its_image_and_the_pods_shared_directory_only(
    cri: CriClient, containerd: PrivateContainerd
) -> None:
    _, container = guest_pod(cri, containerd.image)
    mounts = run(cri, container, "cat /proc/1/mountinfo").splitlines()
    # mountinfo: id parent major:minor root mountpoint options ... - fstype source superoptions
    fields = [(line.split()[4], line.split(" - ")[1].split()) for line in mounts]
    shared = [
        (point, kind, source) for point, (kind, source, *_) in fields if kind in ("9p", "virtiofs")
    ]
    assert shared == [(SHARED_IN_GUEST, "9p", "pyshimShared")], mounts
    usr = [(kind, source) for point, (kind, source, *_) in fields if point == "/usr"]
    assert usr == [("erofs", "/dev/vda")], mounts
    for probe in HOST_USR_PROBES:
        if Path(probe).exists():  # the host has it: the guest must not
            assert (
                run(cri, container, f"test -e /proc/1/root{probe} && echo yes || echo no") == "no\n"
            )
    assert run(cri, container, "test -x /proc/1/root/usr/bin/python3 && echo yes") == "yes\n"


def test_two_clones_of_one_template_differ_in_what_makes_a_machine(
    cri: CriClient, containerd: PrivateContainerd
) -> None:
    identities = []
    for _ in range(2):
        _, container = guest_pod(cri, containerd.image)
        identities.append(run(cri, container, IDENTITY).split("\n"))
    log = containerd.log_path.read_text()
    assert vm_starts(log)[-2:] == ["restored", "restored"], cold_boot_reasons(log)
    first, second = identities
    names = ("machine id", "boot id", "random bytes", "MAC")
    for name, mine, theirs in zip(names, first, second, strict=False):
        assert mine and mine != theirs, (name, first, second)
