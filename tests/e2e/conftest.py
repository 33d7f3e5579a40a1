"""Fixtures for tests against a real, private containerd (see harness.py).

`containerd` is one PrivateContainerd per session, chosen by PYSHIM_CONTAINERD (1.6 default,
1.7, 2.1); after every test the autouse `clean_containerd` removes what the test left and fails
it if a shim process, a mount or a FIFO dir outlived its tasks.
"""

from collections.abc import Iterator

import pytest
from harness import DEFAULT_VERSION, HarnessError, PrivateContainerd, unusable_reason, wait_until


@pytest.fixture(scope="session")
def containerd() -> Iterator[PrivateContainerd]:
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)
    version = DEFAULT_VERSION
    try:
        with PrivateContainerd(version=version) as private:
            yield private
    except HarnessError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(autouse=True)
def clean_containerd(containerd: PrivateContainerd) -> Iterator[None]:
    yield
    containerd.remove_all()
    # Shims exit shortly after their last task is deleted.
    wait_until(lambda: not containerd.leftovers(), timeout=10, interval=0.1)
    leftovers = containerd.leftovers()
    if leftovers:
        containerd.force_clean()
        pytest.fail("test left behind:\n  " + "\n  ".join(leftovers), pytrace=False)
