"""What the guest needs before CRIU runs there (the OCI runtime's checkpoint and restore).

Debian's 6.1 kernel builds the socket-diag, tun, veth and nf_tables support CRIU probes as
modules: `criu check` fails until they are loaded, and a dump of a container's network
namespace fails without nf_conntrack_netlink (both measured in scripts/vm-test's guest). They
are loaded once, before the first checkpoint or restore, not at boot: a VM that never
checkpoints pays nothing for them.
"""

from __future__ import annotations

import asyncio
import logging

from shim.sys.reaper import Reaper
from shim.sys.spawn import run_command

log = logging.getLogger(__name__)

# In this order (libcrc32c asks for crc32c by name at load, which no "depends=" says: see
# shim.kata.boot); nf_conntrack_netlink: without it a dump of a container's netns fails ("-22
# reported by netlink" reading its conntrack table). scripts/vm-test insmods the same list.
CRIU_MODULES = (
    "inet_diag", "tcp_diag", "udp_diag", "raw_diag", "unix_diag", "netlink_diag",
    "af_packet_diag", "tun", "veth", "nfnetlink", "crc32c_generic", "libcrc32c", "nf_tables",
    "nf_conntrack_netlink",
)  # fmt: skip
MODPROBE_TIMEOUT = 60.0  # a dozen modules under TCG


class CriuModules:
    """Loads the kernel modules CRIU needs, once: later calls wait for the first."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._loading = asyncio.Lock()
        self._loaded = False

    async def ensure(self) -> None:
        async with self._loading:
            if self._loaded:
                return
            argv = ["modprobe", "-a", *CRIU_MODULES]
            try:
                result = await run_command(self._reaper, argv, timeout=MODPROBE_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                log.warning("%s: %s", " ".join(argv), exc)  # CRIU will say what it misses
                return
            if result.status != 0:
                log.warning("%s: %s", " ".join(argv), result.stderr.decode(errors="replace"))
            self._loaded = True
