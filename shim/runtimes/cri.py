"""The annotations containerd's CRI plugin puts on the spec of every container of a pod."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # "sandbox" (the pause) or "container"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"  # the pod's: its pause container's id


def annotation(spec: Mapping[str, Any], key: str) -> str:
    """An annotation of the OCI spec, "" when absent."""
    return str((spec.get("annotations") or {}).get(key) or "")


def is_pod_sandbox(spec: Mapping[str, Any]) -> bool:
    """Whether the spec is a CRI pod's sandbox (pause) container."""
    return annotation(spec, CONTAINER_TYPE) == "sandbox"
