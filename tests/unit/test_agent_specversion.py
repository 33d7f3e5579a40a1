"""The guest's bundles against the spec version its OCI runtime implements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim.agent.specversion import declared_spec_version, limit_bundle_version

CRUN_1_8_1 = """crun version 1.8.1
commit: f8a096be060b22ccd3d5f3ebe44108517fbf6c30
rundir: /run/crun
spec: 1.0.0
+SYSTEMD +SELINUX +APPARMOR +CAP +SECCOMP +EBPF +YAJL
"""
RUNC_1_1_5 = """runc version 1.1.5+ds1
commit: 1.1.5+ds1-1+deb12u1
spec: 1.0.2-dev
go: go1.19.8
libseccomp: 2.5.4
"""


def test_the_declared_version_is_the_spec_line() -> None:
    assert declared_spec_version(CRUN_1_8_1) == "1.0.0"
    assert declared_spec_version(RUNC_1_1_5) == "1.0.2-dev"
    assert declared_spec_version("youki 0.1\n") is None
    assert declared_spec_version("") is None  # no binary: nothing is limited


@pytest.mark.parametrize(
    ("written", "declared", "result"),
    [
        ("1.2.1", "1.0.0", "1.0.0"),  # containerd 2.1's spec, crun 1.8.1
        ("1.1.0", "1.0.2-dev", "1.0.2-dev"),
        ("1.0.2-dev", "1.0.0", "1.0.2-dev"),  # containerd 1.6's: same major.minor, left
        ("1.0.0", "1.2.0", "1.0.0"),  # never raised
        ("weird", "1.0.0", "weird"),  # the runtime says what it makes of it
    ],
)
def test_a_newer_minor_becomes_the_runtimes(
    tmp_path: Path, written: str, declared: str, result: str
) -> None:
    spec = {"ociVersion": written, "process": {"args": ["true"]}, "linux": {"netDevices": {}}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    limit_bundle_version(str(tmp_path), declared)
    assert json.loads((tmp_path / "config.json").read_text()) == {**spec, "ociVersion": result}


def test_a_bundle_without_a_readable_spec_is_left_to_the_runtime(tmp_path: Path) -> None:
    limit_bundle_version(str(tmp_path), "1.0.0")  # no config.json
    (tmp_path / "config.json").write_text("{not json")
    limit_bundle_version(str(tmp_path), "1.0.0")
    assert (tmp_path / "config.json").read_text() == "{not json"
