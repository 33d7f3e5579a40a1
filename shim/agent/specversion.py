"""A bundle's ociVersion, no newer than the version of the OCI runtime spec that the guest's
runtime says it implements (the `spec:` line of `<runtime> --version`).

crun refuses any other major.minor than its own ("unknown version specified": crun 1.8.1,
Debian 12's, implements 1.0.0), and containerd 2.x writes 1.2.x specs. runc takes any version
and ignores the fields it does not know; the guest's crun does too once the version is its own,
so a VM behaves alike under either runtime.
"""

from __future__ import annotations

import json
import logging
import os
import re

from shim.runtimes.base import Container, ContainerConfig, ShimContext
from shim.runtimes.runc import RuncRuntime

log = logging.getLogger(__name__)

_SPEC_LINE = re.compile(r"^spec:\s*(\S+)\s*$", re.MULTILINE)
_MAJOR_MINOR = re.compile(r"^(\d+)\.(\d+)")


def declared_spec_version(version_output: str) -> str | None:
    """The spec version in a runtime's `--version` output, if it names one."""
    found = _SPEC_LINE.search(version_output)
    return found.group(1) if found else None


def _major_minor(version: str) -> tuple[int, int] | None:
    found = _MAJOR_MINOR.match(version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def limit_bundle_version(bundle: str, declared: str) -> None:
    """Rewrite the bundle's config.json with ociVersion `declared` where its own version is of a
    newer major.minor; any other spec (or one that cannot be read: create says why) is left."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as f:
            spec = json.load(f)
        version = spec["ociVersion"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    ours, theirs = _major_minor(str(version)), _major_minor(declared)
    if ours is None or theirs is None or ours <= theirs:
        return
    log.debug("bundle %s: ociVersion %s -> %s (the runtime's)", bundle, version, declared)
    spec["ociVersion"] = declared
    with open(path, "w") as f:
        json.dump(spec, f)


class SpecLimitedRuntime(RuncRuntime):
    """The runc backend, with each bundle's ociVersion limited to `declared` (if known) before
    the runtime sees it: the agent writes config.json, then asks for the container."""

    def __init__(self, context: ShimContext, declared: str | None) -> None:
        super().__init__(context)
        self.declared = declared

    def container(self, config: ContainerConfig) -> Container:
        if self.declared is not None:
            limit_bundle_version(config.bundle, self.declared)
        return super().container(config)
