"""The checkpoint tests' workload: a shell counting in a file ten times a second.

A random token and the count live in the shell's memory; the file only shows them. A process
started afresh would write another token (and 1, 2, ...) over the file the checkpoint's rw
diff brought along, so a restored counter shows the token it had and a count going on.
"""

from __future__ import annotations

from harness import PrivateContainerd

COUNT_FILE = "/tmp/n"
COUNTER = [
    "sh",
    "-c",
    't=$(head -c8 /dev/urandom | od -An -tx1 | tr -d " \n"); i=0; '
    f'while :; do i=$((i+1)); echo "$t $i" > {COUNT_FILE}; sleep 0.1; done',
]


def parse_count(text: str) -> tuple[str, int]:
    """The token and the count in the count file's text (0 before the first write)."""
    token, _, number = text.strip().partition(" ")
    return token, int(number or 0)


def shown(containerd: PrivateContainerd, name: str) -> tuple[str, int]:
    """The token and the count a ctr container's counter last wrote."""
    return parse_count(containerd.exec_output(name, "cat", COUNT_FILE))


def count(containerd: PrivateContainerd, name: str) -> int:
    return shown(containerd, name)[1]
