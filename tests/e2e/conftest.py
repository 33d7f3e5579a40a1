"""Fixtures for tests against a real, private containerd (see harness.py).

`containerd` is one PrivateContainerd per session, chosen by PYSHIM_CONTAINERD (1.6 default,
1.7, 2.1); after every test the autouse `clean_containerd` removes what the test left and fails
it if a shim process, a mount or a FIFO dir outlived its tasks.
"""

from collections.abc import Iterator

import pytest
from harness import PrivateContainerd
from session import fail_if_left, private_containerd


@pytest.fixture(scope="session")
def containerd() -> Iterator[PrivateContainerd]:
    yield from private_containerd()


@pytest.fixture(autouse=True)
def clean_containerd(containerd: PrivateContainerd) -> Iterator[None]:
    yield
    containerd.remove_all()
    fail_if_left(containerd.leftovers, containerd.force_clean, timeout=10)
