"""The one error the installer reports: a message for the administrator, never a traceback."""

from __future__ import annotations


class InstallError(Exception):
    pass
