"""What every suite's conftest does with its private containerd (pytest-aware; harness.py is
plain Python so the demo can use it).

`private_containerd` is the body of a session `containerd` fixture: skipped where the machine
cannot run containerd, failed when the harness cannot start it. `fail_if_left` ends each test's
cleanup: it waits for what the test left to go, then force-cleans and fails the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from harness import (
    DEFAULT_VERSION,
    NAMESPACE,
    HarnessError,
    PrivateContainerd,
    unusable_reason,
    wait_until,
)


def private_containerd(
    *, cri: bool = False, namespace: str = NAMESPACE
) -> Iterator[PrivateContainerd]:
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)
    try:
        with PrivateContainerd(version=DEFAULT_VERSION, cri=cri, namespace=namespace) as private:
            yield private
    except HarnessError as error:
        pytest.fail(str(error), pytrace=False)


def fail_if_left(
    leftovers: Callable[[], list[str]], force_clean: Callable[[], None], timeout: float
) -> None:
    """`force_clean` must remove all that `leftovers` reports, so that one failed test does not
    fail every test after it."""
    # Shims exit (and runtimes clear their state) shortly after the last task is deleted.
    wait_until(lambda: not leftovers(), timeout=timeout, interval=0.1)
    found = leftovers()
    if found:
        force_clean()
        pytest.fail("test left behind:\n  " + "\n  ".join(found), pytrace=False)
