"""CRIU's logs, as runc leaves them in a checkpoint's or restore's work directory: the errors
a failed dump or restore gives the client, and the log kept where it outlives the work dir."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence

DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
KEPT_DUMP_LOG = "criu-dump.log"  # the name containerd's runc shim gives its copy
MAX_ERRORS = 3
MAX_LOG_BYTES = 4 << 20  # CRIU's verbose log of a big process; its errors are near the end

# "(00.012345) Error (criu/files-reg.c:1747): Can't ...", or with a task's pid ("1: Error"),
# or a parasite's ("pie: 7: Error").
_ERROR = re.compile(r"^\(\s*[\d.]+\)\s+(?:pie:\s+)?(?:\d+:\s+)?(Error \(.*)$")


def log_errors(path: str) -> list[str]:
    """The last few error lines of a CRIU log, timestamps off; [] if none or unreadable."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - MAX_LOG_BYTES))
        lines = f.read().decode(errors="replace").splitlines()
        errors = [m.group(1) for m in map(_ERROR.match, lines) if m]
        return errors[-MAX_ERRORS:]
    return []


def keep_log(log: str, destinations: Sequence[str]) -> str | None:
    """Copy a CRIU log into the first of `destinations` (directories) that takes it, as
    KEPT_DUMP_LOG; the copy's path, or None (no log, or nowhere writable)."""
    if not os.path.isfile(log):
        return None
    for directory in destinations:
        kept = os.path.join(directory, KEPT_DUMP_LOG)
        try:
            shutil.copyfile(log, kept)
        except OSError:
            continue
        return kept
    return None


def describe_failure(runtime_message: str, errors: Sequence[str], log: str | None) -> str:
    """runc's own first line (e.g. "criu failed: type NOTIFY errno 0"), CRIU's errors, and
    where its log is."""
    parts = [runtime_message.splitlines()[0] if runtime_message else "unknown error"]
    if errors:
        parts.append("CRIU: " + "; ".join(errors))
    if log:
        parts.append(f"log: {log}")
    return ", ".join(parts)
