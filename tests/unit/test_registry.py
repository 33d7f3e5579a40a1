"""Backends are found by name: built-ins first, then other packages' entry points."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.runtimes.registry import (
    UnknownRuntimeError,
    find_runtime,
    runtime_name_from_binary,
)
from shim.runtimes.runc import RuncRuntime

THIRD_PARTY_MODULE = '''
from shim.runtimes.runc import RuncRuntime


class ThirdPartyRuntime(RuncRuntime):
    """A runtime shipped by another package."""
'''


@pytest.fixture
def third_party_package(tmp_path: Path) -> Iterator[None]:
    """An installed distribution, as pip leaves it, that declares a pyshim runtime."""
    (tmp_path / "thirdparty_shim.py").write_text(THIRD_PARTY_MODULE)
    dist_info = tmp_path / "thirdparty_shim-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-shim\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[pyshim.runtimes]\nthirdparty = thirdparty_shim:ThirdPartyRuntime\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("thirdparty_shim", None)


def test_binary_names_map_to_runtime_names() -> None:
    assert runtime_name_from_binary("/usr/bin/containerd-shim-pyrunc-v1") == "pyrunc"
    assert runtime_name_from_binary("containerd-shim-my-runtime-v2") == "my-runtime"
    with pytest.raises(UnknownRuntimeError):
        runtime_name_from_binary("python3")


def test_builtin_runtime() -> None:
    assert find_runtime("pyrunc") is RuncRuntime


def test_a_third_party_package_adds_a_runtime(third_party_package: None) -> None:
    runtime = find_runtime("thirdparty")
    assert runtime.__name__ == "ThirdPartyRuntime"
    assert issubclass(runtime, RuncRuntime)


def test_unknown_runtime_names_what_is_known() -> None:
    with pytest.raises(UnknownRuntimeError, match="pyrunc"):
        find_runtime("nonesuch")
