"""Retrying a filesystem operation the kernel refuses with EBUSY while a process lets go."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable


def retry_while_busy(operation: Callable[[], object], tries: int, delay: float, error: str) -> None:
    """Run ``operation`` until it succeeds; sleep ``delay`` s after each EBUSY and raise
    OSError(EBUSY, error) after ``tries`` of them. Any other error is raised at once."""
    for _ in range(tries):
        try:
            operation()
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        time.sleep(delay)
    raise OSError(errno.EBUSY, error)
