"""Whether this machine's runsc refuses a pod's network namespace by mistake (gVisor issue
10704): runsc before release-20240807.0 takes any netns that shows
/proc/sys/net/core/rmem_default for the host's, and Linux 6.11 and later show it in every netns.
Standard library only, like the harness."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

FIXED_RELEASE = 20240807  # as shim.runtimes.runsc
# In a fresh netns: rmem_default shown, and dev_weight (the initial netns's alone) not.
MISJUDGED_PROBE = (
    "test -e /proc/sys/net/core/rmem_default && ! test -e /proc/sys/net/core/dev_weight"
)


@functools.cache
def netstack_refused_here(binary: str = "runsc") -> bool:
    """Whether gVisor's netstack (network=sandbox) fails in a pod's netns on this machine."""
    if shutil.which(binary) is None or shutil.which("unshare") is None:
        return False
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    match = re.search(r"runsc version \S*?(\d{8})\.\d+", version.stdout)
    if match is None or int(match.group(1)) >= FIXED_RELEASE:
        return False
    probe = subprocess.run(
        ["unshare", "--net", "sh", "-c", MISJUDGED_PROBE], capture_output=True, timeout=30
    )
    return probe.returncode == 0
