"""The container's OCI spec as the guest runs it: every host path in it is replaced by its
place in the VM's shared directory, or dropped.

The host's spec names host things: bind-mount sources (CRI's hosts, resolv.conf, the pod's
/dev/shm), namespace paths of the pod's sandbox (by the pid containerd knows, QEMU's), a
cgroup path in the host's scheme, the host's AppArmor or SELinux labels and hooks (host
binaries). In the guest, bind sources are the shared copies the host bound beside the rootfs,
the sandbox's namespaces are those of its init in the guest, and the rest is left to the
guest's defaults.

Mount boundaries: the guest sees a bind source and every mount below it as one 9p file system,
so runc's non-recursive read-only ("rbind" + "ro": only the top mount is remounted read-only)
would make the host mounts below it read-only too. Each of those gets a bind of its own in the
guest, after its parent's, with its own read-only state, as it has in runc's tree on a host.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from shim.runtimes.spec import is_bind, is_readonly_top_only, submount_bind
from shim.sys.mount import Submount

SHARED_IN_GUEST = "/pyshim/shared"  # the VM's shared directory, mounted by 9p
_PROC_NS = re.compile(r"/proc/(\d+)/ns/\w+")


def shared_bind_name(index: int) -> str:
    """The name, under the container's shared dir, of the copy of its `index`-th mount."""
    return f"mounts/{index}"


def container_dir_in_guest(container_id: str) -> str:
    return f"{SHARED_IN_GUEST}/{container_id}"


def guest_spec(
    spec: Mapping[str, Any],
    container_id: str,
    *,
    vm_pid: int,
    sandbox_guest_pid: int | None,
    vm_netns: str = "",
    submounts: Mapping[str, Sequence[Submount]] | None = None,
) -> dict[str, Any]:
    """`spec` for the guest agent; its rootfs is given to the agent apart. `vm_netns`: the
    host netns whose network the VM has; in the guest that is the root netns, where the NIC is,
    so a container given that netns (the pod's sandbox) stays in the guest's. `submounts`: the
    host mounts below each shared bind (by its shared name), shallowest first."""
    guest = copy.deepcopy(dict(spec))
    shared = container_dir_in_guest(container_id)
    mounts: list[dict[str, Any]] = []
    for index, mount in enumerate(guest.get("mounts") or []):
        mounts.append(mount)
        if not is_bind(mount):
            continue
        name = shared_bind_name(index)
        mount["source"] = f"{shared}/{name}"
        if is_readonly_top_only(mount):
            below = (submounts or {}).get(name, ())
            mounts += [submount_bind(mount, submount) for submount in below]
    if "mounts" in guest:
        guest["mounts"] = mounts
    linux = guest.setdefault("linux", {})
    namespaces = []
    for namespace in linux.get("namespaces") or []:
        if vm_netns and namespace.get("type") == "network" and namespace.get("path") == vm_netns:
            continue
        match = _PROC_NS.fullmatch(namespace.get("path", ""))
        if match and int(match[1]) == vm_pid and sandbox_guest_pid:
            namespace["path"] = f"/proc/{sandbox_guest_pid}/ns/{namespace['path'].rsplit('/')[-1]}"
        else:  # a host file (a CNI netns): the guest gives a fresh one
            namespace.pop("path", None)
        namespaces.append(namespace)
    linux["namespaces"] = namespaces
    linux["cgroupsPath"] = f"/pyshim/{container_id}"
    linux.pop("mountLabel", None)
    guest.pop("hooks", None)
    if "process" in guest:
        guest["process"] = guest_process(guest["process"])
    return guest


def guest_process(process: Mapping[str, Any]) -> dict[str, Any]:
    """An exec's OCI Process without the host's security labels."""
    guest = dict(process)
    guest.pop("apparmorProfile", None)
    guest.pop("selinuxLabel", None)
    return guest
