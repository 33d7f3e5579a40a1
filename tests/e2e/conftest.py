"""Fixtures for tests against a real, private containerd (see harness.py).

`containerd` is one PrivateContainerd per session, chosen by PYSHIM_CONTAINERD (1.6 default,
1.7, 2.1); after every test the autouse `clean_containerd` removes what the test left and fails
it if a shim process, a mount or a FIFO dir outlived its tasks. `other_containerd` is a second
one for a test that moves a container between two (another node: its own root, state and
namespace), checked the same way when the test ends and then stopped.
"""

from collections.abc import Iterator

import pytest
from harness import NAMESPACE, PrivateContainerd
from session import fail_if_left, private_containerd


@pytest.fixture(scope="session")
def containerd() -> Iterator[PrivateContainerd]:
    yield from private_containerd()


@pytest.fixture(autouse=True)
def clean_containerd(containerd: PrivateContainerd) -> Iterator[None]:
    yield
    containerd.remove_all()
    fail_if_left(containerd.leftovers, containerd.force_clean, timeout=10)


@pytest.fixture
def other_containerd() -> Iterator[PrivateContainerd]:
    started = private_containerd(namespace=f"{NAMESPACE}-other")
    other = next(started)
    try:
        yield other
        other.remove_all()
        fail_if_left(other.leftovers, other.force_clean, timeout=10)
    finally:
        started.close()  # stops it (PrivateContainerd.close)
