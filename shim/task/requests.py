"""Checks of what a client sends, shared by the Task service and the VM's guest agent (which
imports this alone: the Task service's modules and APIs are not read in the guest)."""

from __future__ import annotations

import json
from typing import Any

from shim.ttrpc.errors import Code, TtrpcError


def check_id(kind: str, value: str) -> None:
    """Ids become file names in the bundle: refuse anything that could leave it."""
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid {kind} {value!r}")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object sent by the client (an OCI spec or part of one)."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"{what} must be a JSON object")
    return value
