"""File descriptor housekeeping for processes we fork without exec."""

from __future__ import annotations

import os
from collections.abc import Iterable


def close_all_except(kept: Iterable[int]) -> None:
    """Close every fd of this process but the kept ones."""
    start = 0
    for fd in [*sorted(set(kept)), os.sysconf("SC_OPEN_MAX")]:
        if fd > start:  # os.closerange(n, n) closes every fd from n up on CPython 3.11
            os.closerange(start, fd)
        start = fd + 1
