"""What an OCI spec says, read one way by every backend: its network namespace and its bind
mounts (runc's reading: a bind is type "bind" or a "bind"/"rbind" option)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shim.sys.mount import Submount


def network_namespace(spec: Mapping[str, Any]) -> str | None:
    """The path of the spec's network namespace: "" for a new one, None for the host's (no
    network namespace in the spec)."""
    return namespace_path(spec, "network")


def namespace_path(spec: Mapping[str, Any], kind: str) -> str | None:
    """The path of the spec's namespace of this kind ("network", "uts", ...): "" for a new
    one, None for the host's (none of that kind in the spec)."""
    for namespace in (spec.get("linux") or {}).get("namespaces") or []:
        if namespace.get("type") == kind:
            return str(namespace.get("path") or "")
    return None


def is_bind(mount: Mapping[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def is_recursive(mount: Mapping[str, Any]) -> bool:
    """A bind that takes the mounts below its source along (runc: only with "rbind")."""
    return "rbind" in (mount.get("options") or [])


def is_readonly_top_only(mount: Mapping[str, Any]) -> bool:
    """runc's non-recursive read-only bind ("rbind" + "ro", no "rro"): only its top mount is
    remounted read-only; the mounts below its source keep their own state."""
    options = mount.get("options") or []
    return is_recursive(mount) and "ro" in options and "rro" not in options


def submount_bind(parent: Mapping[str, Any], submount: Submount) -> dict[str, Any]:
    """A bind of its own for a mount below `parent`'s source, at its place below `parent`'s
    destination, read-only only if that mount is: for a runtime that would otherwise see the
    whole source as one file system under `parent`'s read-only state."""
    propagation = [o for o in parent.get("options") or [] if o.endswith(("private", "slave"))]
    return {
        "destination": f"{parent['destination'].rstrip('/')}/{submount.path}",
        "type": "bind",
        "source": f"{parent['source']}/{submount.path}",
        "options": ["bind", *propagation, "ro" if submount.readonly else "rw"],
    }
