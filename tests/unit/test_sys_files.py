"""shim.sys.files.replace_file: whole content and mode, or nothing changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.sys import files
from shim.sys.files import replace_file


def test_replaces_the_content_with_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    replace_file(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["f"]


def test_a_failed_write_leaves_the_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    target.write_text("old")

    def fail(src: str, dst: object) -> None:
        raise OSError("no rename")

    monkeypatch.setattr(files.os, "rename", fail)
    with pytest.raises(OSError, match="no rename"):
        replace_file(target, b"new", 0o644)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]
