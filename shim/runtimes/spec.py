"""What an OCI spec says, read one way by every backend: its network namespace and its bind
mounts (runc's reading: a bind is type "bind" or a "bind"/"rbind" option)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def network_namespace(spec: Mapping[str, Any]) -> str | None:
    """The path of the spec's network namespace: "" for a new one, None for the host's (no
    network namespace in the spec)."""
    for namespace in (spec.get("linux") or {}).get("namespaces") or []:
        if namespace.get("type") == "network":
            return str(namespace.get("path") or "")
    return None


def is_bind(mount: Mapping[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def is_recursive(mount: Mapping[str, Any]) -> bool:
    """A bind that takes the mounts below its source along (runc: only with "rbind")."""
    return "rbind" in (mount.get("options") or [])
