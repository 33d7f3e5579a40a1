"""What a forked process shows as its command line (/proc/PID/cmdline: ps, pgrep -f) and name.

Every shim daemon is a fork of the template and would show the template's argv, which is
the first ``start`` it served: the wrong container id for every other shim. Like setproctitle,
this writes over the argv strings the process was started with (their address is in
/proc/self/stat); unlike it, it never touches the environment that follows them, so what does
not fit is cut. Changing the kernel's pointers instead (prctl PR_SET_MM) needs CAP_SYS_RESOURCE.
"""

from __future__ import annotations

import contextlib

from shim.sys._native import ffi

# Fields 48 and 49 of /proc/PID/stat (1-based), counted from field 3, the first after comm.
_ARG_START, _ARG_END = 48 - 3, 49 - 3


def set_cmdline(args: list[str]) -> None:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[_ARG_START]), int(fields[_ARG_END])
    size = end - start
    if size <= 0:
        return
    text = b"\0".join(arg.encode() for arg in args)[: size - 1]
    ffi.memmove(ffi.cast("char *", start), text.ljust(size, b"\0"), size)


def set_comm(name: str) -> None:
    """The process name (/proc/PID/comm: ps, pgrep without -f); the kernel keeps 15 bytes."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(name[:15])
