"""The checked-in shim/api must be exactly what scripts/genproto makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_api_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "genproto"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = _tree(tmp_path / "shim" / "api")
    checked_in = _tree(REPO / "shim" / "api")
    assert fresh, "genproto produced nothing"
    missing = sorted(fresh.keys() - checked_in.keys())
    extra = sorted(checked_in.keys() - fresh.keys())
    stale = sorted(k for k in fresh.keys() & checked_in.keys() if fresh[k] != checked_in[k])
    assert not (missing or extra or stale), (
        f"shim/api is stale, run scripts/genproto: missing={missing} extra={extra} stale={stale}"
    )


def test_every_proto_has_a_module() -> None:
    protos = sorted((REPO / "proto").rglob("*.proto"))
    assert protos
    for proto in protos:
        rel = proto.relative_to(REPO / "proto").with_suffix("")
        if rel.parts[0] == "pyshim":  # our own APIs: proto/pyshim/X -> shim/api/X
            rel = Path("shim", "api", *rel.parts[1:])
        module = REPO / rel.parent / f"{rel.name}_pb2.py"
        assert module.exists(), f"{proto} has no generated module {module}"
