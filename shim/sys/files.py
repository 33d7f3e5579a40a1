"""Replacing a file whole: readers see the old content or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_file(path: str | Path, data: bytes, mode: int) -> None:
    """Writes `data` to a temporary file beside `path` and renames it over `path`; on failure
    the temporary file goes and `path` is untouched."""
    directory, name = os.path.split(path)
    fd, temporary = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
