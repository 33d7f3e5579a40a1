"""Errors from the cffi helper (shim.sys._native) as Python exceptions."""

from __future__ import annotations

import os

from shim.sys._native import ffi


def last_error(what: str) -> OSError:
    """The OSError for the errno a failed native call left, prefixed with `what`."""
    code = ffi.errno
    return OSError(code, f"{what}: {os.strerror(code)}")
