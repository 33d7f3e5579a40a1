"""What makes one VM unlike its siblings, set by the host's SetupGuest before anything else.

A VM restored from a template starts with the template's RAM: the same kernel random state, the
same wall clock (the moment the template was saved), the same ids. The host sends fresh ones;
the pod's shared directory is mounted here too, since the template was saved before any pod
existed (a mounted 9p share would also block QEMU's migration).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import time

from shim.agent.netlink import Netlink, virtio_nic
from shim.api.agent.v1 import agent_pb2 as api
from shim.sys.mount import MountSpec, mount_rootfs
from shim.ttrpc.errors import Code, TtrpcError
from shim.vm.guest import NINEP_OPTIONS

log = logging.getLogger(__name__)

# linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MACHINE_ID = "/etc/machine-id"


def setup_guest(request: api.SetupGuestRequest) -> None:
    """Idempotent: the host repeats it after a lost connection."""
    if request.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    if request.HasField("time"):
        time.clock_settime_ns(time.CLOCK_REALTIME, request.time.ToNanoseconds())
    if request.random_seed:
        seed_random(request.random_seed)
    if request.machine_id:
        with open(MACHINE_ID, "w") as f:
            f.write(request.machine_id + "\n")
    if request.hostname:
        socket.sethostname(request.hostname)
    if request.nic_mac:
        set_nic_mac(request.nic_mac)
    else:
        remove_nic()
    if request.shared_tag and not os.path.ismount(request.shared_path):
        os.makedirs(request.shared_path, exist_ok=True)
        share = MountSpec("9p", request.shared_tag, "", (*NINEP_OPTIONS.split(","), "rw"))
        mount_rootfs([share], request.shared_path)
    log.info("guest set up: %s, %s", request.hostname, request.machine_id)


def set_nic_mac(mac: str) -> None:
    """Before the link is up: its MAC is what UpdateInterface finds it by."""
    nic = virtio_nic()
    if nic is None:
        raise TtrpcError(Code.FAILED_PRECONDITION, "the VM has no virtio-net NIC")
    with Netlink() as netlink:
        netlink.set_link_address(nic[1], mac)


def remove_nic() -> None:
    """A VM without a pod network has no NIC, as before templates: its driver lets go of it."""
    nic = virtio_nic()
    if nic is not None:
        device = os.path.basename(os.path.realpath(f"/sys/class/net/{nic[0]}/device"))
        with open("/sys/bus/virtio/drivers/virtio_net/unbind", "w") as f:
            f.write(device)


def seed_random(seed: bytes) -> None:
    """Mix `seed` into the input pool, credited, and reseed the generator from it at once: what
    a clone reads from /dev/urandom (and boot_id, generated on first read) is its own."""
    entropy = struct.pack("ii", len(seed) * 8, len(seed)) + seed
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, entropy)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
