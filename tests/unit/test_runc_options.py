"""What the runc backend keeps in its options."""

from __future__ import annotations

from pathlib import Path

from shim.runtimes.runc import RuncOptions


def test_delete_runs_runc_only_while_runc_may_hold_the_container(tmp_path: Path) -> None:
    options = RuncOptions(root=str(tmp_path))
    assert not options.may_hold("ns", "gone")
    (tmp_path / "ns" / "alive").mkdir(parents=True)
    assert options.may_hold("ns", "alive")
    # Another OCI runtime behind the runc backend may lay out its state otherwise.
    assert RuncOptions(binary_name="/usr/bin/crun", root=str(tmp_path)).may_hold("ns", "gone")
