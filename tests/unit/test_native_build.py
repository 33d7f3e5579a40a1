"""The launcher's build: without a C compiler (or when asked) the shims stay Python scripts."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.native.build import build_launchers


def test_builds_one_launcher_per_shim_name(tmp_path: Path) -> None:
    paths = build_launchers(tmp_path, ["containerd-shim-a-v1", "containerd-shim-b-v1"])
    assert paths == [str(tmp_path / "containerd-shim-a-v1"), str(tmp_path / "containerd-shim-b-v1")]
    assert all(Path(path).read_bytes().startswith(b"\x7fELF") for path in paths)


@pytest.mark.parametrize(
    ("variable", "value"), [("CC", "/nonexistent/cc"), ("PYSHIM_NATIVE_LAUNCHER", "0")]
)
def test_no_launcher_without_a_compiler_or_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert build_launchers(tmp_path, ["containerd-shim-a-v1"]) is None
    assert not (tmp_path / "containerd-shim-a-v1").exists()
