"""The container context a wasm runner enters (shim.wasm.context): what the shim plans from
an OCI spec, destinations resolved inside the rootfs, and (as root, in forked children so
that nothing reaches this process or the host) namespaces joined and bind mounts made."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shim.wasm import context
from shim.wasm.context import Bind, open_in_root, plan

pytestmark = pytest.mark.timeout(60)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root")

CRI_SPEC: dict[str, Any] = {
    "hostname": "ignored-when-joined",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        {
            "destination": "/etc/hostname",
            "type": "bind",
            "source": "/sandboxes/p/hostname",
            "options": ["rbind", "rprivate", "rw"],
        },
        {
            "destination": "/etc/resolv.conf",
            "type": "bind",
            "source": "/sandboxes/p/resolv.conf",
            "options": ["rbind", "rprivate", "ro", "nosuid", "nodev"],
        },
        {"destination": "/data", "type": "none", "source": "/vol", "options": ["bind", "rw"]},
    ],
    "linux": {
        "namespaces": [
            {"type": "pid"},
            {"type": "ipc", "path": "/proc/7/ns/ipc"},
            {"type": "uts", "path": "/proc/7/ns/uts"},
            {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
        ]
    },
}


def test_a_cri_container_joins_the_pods_namespaces_and_gets_its_binds() -> None:
    planned = plan(CRI_SPEC)

    assert planned["join"] == [
        {"type": "ipc", "path": "/proc/7/ns/ipc"},
        {"type": "uts", "path": "/proc/7/ns/uts"},
        {"type": "network", "path": "/var/run/netns/cni-1"},
    ]
    assert (planned["new"], planned["hostname"]) == ([], None)  # not pid, not mount by spec
    assert [(b["destination"], b["readonly"], b["flags"]) for b in planned["binds"]] == [
        ("/etc/hostname", False, []),
        ("/etc/resolv.conf", True, ["nosuid", "nodev"]),
        ("/data", False, []),
    ]
    assert [b["recursive"] for b in planned["binds"]] == [True, True, False]
    assert plan(CRI_SPEC, init_pid=99) == planned  # every namespace has a path already


def test_namespaces_without_a_path_are_new_for_the_init_and_the_inits_for_an_exec() -> None:
    spec = {
        "hostname": "box",
        "linux": {"namespaces": [{"type": "network"}, {"type": "uts"}, {"type": "pid"}]},
    }

    init = plan(spec)
    exec_ = plan(spec, init_pid=42)

    assert (init["join"], init["new"], init["hostname"]) == ([], ["network", "uts"], "box")
    assert exec_["join"] == [
        {"type": "network", "path": "/proc/42/ns/net"},
        {"type": "uts", "path": "/proc/42/ns/uts"},
    ]
    assert (exec_["new"], exec_["hostname"]) == ([], None)
    assert plan({}) == {"join": [], "new": [], "hostname": None, "binds": []}


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "run").mkdir()
    (tmp_path / "outside").mkdir()
    return root


@pytest.mark.parametrize(
    ("link", "target", "path", "expected"),
    [
        ("etc/resolv.conf", "/run/resolv.conf", "/etc/resolv.conf", "run/resolv.conf"),
        ("etc/up", "../../../outside", "/etc/up/f", "outside/f"),
        ("etc/abs", "/../outside", "/etc/abs/f", "outside/f"),
        ("etc/rel", "../run", "/etc/rel/x/y", "run/x/y"),
    ],
)
def test_a_destination_never_resolves_out_of_the_rootfs(
    rootfs: Path, link: str, target: str, path: str, expected: str
) -> None:
    os.symlink(target, rootfs / link)

    found = fd_path(open_in_root(str(rootfs), path, "file"))

    assert found == str(rootfs / expected)
    assert (rootfs / expected).is_file()
    assert not (rootfs.parent / "outside" / "f").exists()


def test_missing_directories_are_made_and_the_last_part_as_asked(rootfs: Path) -> None:
    assert fd_path(open_in_root(str(rootfs), "/a/b/../c", "dir")) == str(rootfs / "a" / "c")
    assert (rootfs / "a" / "b").is_dir() and (rootfs / "a" / "c").is_dir()
    assert fd_path(open_in_root(str(rootfs), "/../..", None)) == str(rootfs)

    with pytest.raises(FileNotFoundError):
        open_in_root(str(rootfs), "/nothing", None)
    (rootfs / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        open_in_root(str(rootfs), "/file/x", "file")
    os.symlink("loop", rootfs / "loop")
    with pytest.raises(OSError) as looped:
        open_in_root(str(rootfs), "/loop", "file")
    assert looped.value.errno == errno.ELOOP


def in_child(body: Callable[[], object]) -> Any:
    """body()'s JSON result (or the OSError it raised, as a string) from a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            try:
                result: object = body()
            except OSError as exc:
                result = {"error": str(exc)}
            os.write(write_end, json.dumps(result).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


@needs_root
def test_binds_appear_in_the_rootfs_of_the_runner_alone(rootfs: Path, tmp_path: Path) -> None:
    hostname = tmp_path / "hostname"
    hostname.write_text("netpod\n")
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "data.txt").write_text("in the volume")
    # Resolved inside the rootfs, as runc does (a WASI module follows only relative links).
    os.symlink("/run/hostname", rootfs / "etc" / "hostname")
    binds: list[Bind] = [
        {
            "source": str(hostname),
            "destination": "/etc/hostname",
            "recursive": True,
            "readonly": True,
            "flags": ["nosuid"],
        },
        {
            "source": str(volume),
            "destination": "/mnt/vol",
            "recursive": False,
            "readonly": False,
            "flags": [],
        },
    ]
    before = mountinfo()

    def body() -> object:
        fds = set(os.listdir("/proc/self/fd"))
        context.enter({"join": [], "new": [], "hostname": None, "binds": binds}, str(rootfs), [])
        try:
            (rootfs / "run" / "hostname").write_text("overwritten")
            writable = True
        except OSError as exc:
            writable = exc.errno != errno.EROFS
        return {
            "hostname": (rootfs / "run" / "hostname").read_text(),
            "volume": (rootfs / "mnt" / "vol" / "data.txt").read_text(),
            "writable": writable,
            "fds left": sorted(set(os.listdir("/proc/self/fd")) - fds),
        }

    seen = in_child(body)

    assert "error" not in seen, seen["error"]
    assert seen["hostname"] == "netpod\n"
    assert seen["volume"] == "in the volume"
    assert seen["writable"] is False
    assert seen["fds left"] == []
    assert mountinfo() == before, "no mount reaches the host"
    assert (rootfs / "run" / "hostname").read_text() == ""  # the made mount point, empty
    assert (rootfs / "mnt" / "vol").is_dir()
    assert hostname.read_text() == "netpod\n"


@needs_root
def test_the_runner_joins_a_namespace_by_its_file_and_makes_new_ones(tmp_path: Path) -> None:
    holder = os.fork()  # a process in a namespace of its own, as a pod's pause is
    if holder == 0:
        try:
            context.enter(
                {"join": [], "new": ["network", "uts"], "hostname": "pod", "binds": []}, "/", []
            )
            signal.pause()
        finally:
            os._exit(0)
    try:
        netns = f"/proc/{holder}/ns/net"
        utsns = f"/proc/{holder}/ns/uts"
        context_ = {
            "join": [{"type": "network", "path": netns}, {"type": "uts", "path": utsns}],
            "new": [],
            "hostname": None,
            "binds": [],
        }

        def body() -> object:
            fds = context.open_namespaces(context_["join"])  # type: ignore[arg-type]
            context.enter(context_, "/", fds)  # type: ignore[arg-type]
            return {"net": os.stat("/proc/self/ns/net").st_ino, "host": socket.gethostname()}

        seen = None
        for _ in range(100):  # until the holder is in its namespaces
            seen = in_child(body)
            if seen["host"] == "pod":
                break
        assert seen == {"net": os.stat(netns).st_ino, "host": "pod"}
        assert os.stat("/proc/self/ns/net").st_ino != seen["net"]
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_a_namespace_that_cannot_be_opened_is_named_with_its_errno(tmp_path: Path) -> None:
    missing = str(tmp_path / "netns")

    with pytest.raises(OSError) as failed:
        context.open_namespaces([{"type": "network", "path": missing}])

    assert failed.value.errno == errno.ENOENT
    assert f"open the network namespace {missing}: No such file or directory (errno 2)" in str(
        failed.value
    )
