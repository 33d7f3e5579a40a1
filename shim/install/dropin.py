"""The text of the files the installer writes: the containerd drop-in, a starter runsc.toml,
and a pykata.toml naming the VM assets' directory.

Pure functions only; the standard library reads TOML (tomllib) but cannot write it, so this
module writes the little TOML it needs.
"""

from __future__ import annotations

import copy
import datetime
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shim.kata.config import CONFIG_TYPE_URL as PYKATA_CONFIG_TYPE
from shim.runtimes.registry import runtime_type
from shim.runtimes.runsc import CONFIG_TYPE_URL as PYRUNSC_CONFIG_TYPE

MARKER = "# Written by pyshim install"  # the first line of every drop-in we own

# The CRI runtime section per config version, as its table header spells it.
CRI_PLUGIN = {
    2: 'plugins."io.containerd.grpc.v1.cri"',
    3: "plugins.'io.containerd.cri.v1.runtime'",
}
CRI_PLUGIN_V2 = "io.containerd.grpc.v1.cri"

# containerd 1.x's built-in handler, lost once any file defines a runtimes table.
DEFAULT_RUNC = {"runtime_type": "io.containerd.runc.v2"}

_RUNSC_TOML_HEAD = """\
# runsc.toml for pyshim's pyrunsc handler (gVisor's format), written by pyshim install and
# then yours to edit: pyshim never rewrites or removes it.
#
# [runsc_config] holds runsc flags, each as  flag = "value"  (%ID% becomes the container id):
#   platform = "systrap"
#   debug = "true"
#   debug-log = "/var/log/runsc/%ID%/"
# Top-level keys (above the table): binary_name = "runsc", root = "/run/containerd/runsc".
#
# Networking. A pod on a CNI network gets gVisor's own network stack (runsc's default,
# network = "sandbox"); a hostNetwork pod the host's (network = "host"). runsc releases before
# release-20240807.0 refuse to start a pod's sandbox on Linux 6.11 and later (gVisor issue
# 10704): pyshim checks for that and fails the pod with an error saying so, unless a top-level
#   network_fallback = "host"    # the host kernel's stack in the pod's netns (weaker isolation)
#   network_fallback = "none"    # loopback only
# chooses what such pods get instead; the netstack is kept wherever it works. Under
# [runsc_config], network = "host" | "none" | "sandbox" applies to every pod.
#
# Seccomp. runsc enforces a container's seccomp profile (Kubernetes' RuntimeDefault and
# Localhost profiles, Docker's default) inside the sandbox only with oci-seccomp = "true";
# without it pyshim logs a warning for each container whose spec asks for one.
[runsc_config]
"""
OCI_SECCOMP = 'oci-seccomp = "true"\n'


def runsc_toml(oci_seccomp: bool = True, runsc: str = "runsc") -> str:
    """The starter runsc.toml; without ``oci_seccomp`` (a runsc that lacks the flag, which
    it would refuse along with every command) the line stays a comment."""
    if oci_seccomp:
        return _RUNSC_TOML_HEAD + OCI_SECCOMP
    return _RUNSC_TOML_HEAD + f"# {OCI_SECCOMP.strip()}  # {runsc} has no such flag: not enforced\n"


RUNSC_TOML = runsc_toml()


_PYKATA_TOML_HEAD = """\
# pykata.toml for pyshim's pykata handler, written by pyshim install and then yours to edit:
# pyshim never rewrites or removes it. [vm] takes the keys listed in shim/kata/config.py;
# assets_dir is where `pyshim assets` put the VM's kernel and images (pass it the same
# --assets-dir).
"""


def pykata_toml(assets_dir: Path) -> str:
    return _PYKATA_TOML_HEAD + f"[vm]\nassets_dir = {toml_string(str(assets_dir))}\n"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def is_ours(text: str) -> bool:
    return text.startswith(MARKER)


CONFIG_TYPES = {"pyrunsc": PYRUNSC_CONFIG_TYPE, "pykata": PYKATA_CONFIG_TYPE}


def handler_table(name: str, config_files: Mapping[str, Path]) -> dict[str, Any]:
    """The CRI runtime handler for one backend, with its config file if it has one."""
    table: dict[str, Any] = {"runtime_type": runtime_type(name)}
    if name in config_files:
        # CRI sends these as runtimeoptions.v1.Options; the shim reads the file at ConfigPath.
        table["options"] = {"TypeUrl": CONFIG_TYPES[name], "ConfigPath": str(config_files[name])}
    return table


def render_dropin(
    backends: Sequence[str],
    config_version: int,
    config_files: Mapping[str, Path],
    cri_base: Mapping[str, Any] | None = None,
) -> str:
    """The drop-in registering one CRI handler per backend, in config ``version = 2`` or 3;
    ``config_files`` maps a backend to the TOML file its handler names (pyrunsc, pykata).

    ``cri_base``, for containerd 1.x only, is the main config's whole CRI section: 1.x lets a
    file's plugin section replace the previous files' one whole, so the drop-in must repeat it
    (and keep the default ``runc`` handler, which a runtimes table replaces).
    """
    cri: dict[str, Any] = copy.deepcopy(dict(cri_base or {}))
    runtimes = cri.setdefault("containerd", {}).setdefault("runtimes", {})
    if cri_base is not None and not runtimes:
        runtimes["runc"] = dict(DEFAULT_RUNC)
    for name in backends:
        runtimes[name] = handler_table(name, config_files)
    lines = [
        f"{MARKER}; pyshim uninstall removes it. Edits are lost on the next install.",
        "# CRI runtime handlers for the pyshim shims (a RuntimeClass's handler is the table name).",
    ]
    if cri_base is not None:
        lines += [
            "# containerd 1.x keeps only the last file's CRI section, so this one repeats the main",
            "# config's: run pyshim install again after changing the CRI settings there.",
        ]
    lines += [f"version = {config_version}", ""]
    _emit_table(lines, CRI_PLUGIN[config_version], cri)
    text = "\n".join(lines).rstrip("\n") + "\n"
    tomllib.loads(text)  # a writer bug must fail here, not in containerd
    return text


def _emit_table(lines: list[str], header: str, table: Mapping[str, Any]) -> None:
    """Appends ``[header]`` with its values, then its sub-tables. A header is written only for
    a table with values of its own (or none at all), so parents stay implicit."""
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    if scalars or not table:
        lines.append(f"[{header}]")
        lines += [f"  {toml_key(k)} = {toml_value(v)}" for k, v in scalars.items()]
        lines.append("")
    for key, value in table.items():
        if isinstance(value, Mapping):
            _emit_table(lines, f"{header}.{toml_key(key)}", value)


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_string(text: str) -> str:
    return '"' + "".join(_escape(c) for c in text) + '"'


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if ord(char) < 0x20 or char == "\x7f":
        return f"\\u{ord(char):04x}"
    return char


def toml_value(value: Any) -> str:
    """Any value tomllib returns, written back (tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("-inf" if value < 0 else "inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"not a TOML value: {value!r}")
