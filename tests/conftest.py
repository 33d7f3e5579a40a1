"""Shared pytest setup: everything under tests/e2e, tests/cri and tests/docker carries the
`containerd` marker."""

from pathlib import Path

import pytest

CONTAINERD_DIRS = [Path(__file__).parent / name for name in ("e2e", "cri", "docker")]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Lets `pytest -m "not containerd"` run the fast suite alone.
    for item in items:
        if any(item.path.is_relative_to(d) for d in CONTAINERD_DIRS):
            item.add_marker(pytest.mark.containerd)
