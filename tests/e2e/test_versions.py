"""What differs between containerd 1.6, 1.7 and 2.x at the shim's edge: the `start` answer and
the bootstrap files, reload after a restart, runtime options the shim does not know, `-info`."""

from __future__ import annotations

import json

import pytest
from harness import PrivateContainerd, wait_until

RUNTIME = "io.containerd.pyrunc.v1"

pytestmark = pytest.mark.timeout(180)


def is_2x(containerd: PrivateContainerd) -> bool:
    return not containerd.version.startswith("1.")


def require_2x(containerd: PrivateContainerd, missing: str) -> None:
    if not is_2x(containerd):
        pytest.skip(f"containerd {containerd.version} has no {missing}")


def log_since(containerd: PrivateContainerd, offset: int) -> str:
    return containerd.log_path.read_bytes()[offset:].decode(errors="replace")


def ps_pids(containerd: PrivateContainerd, container_id: str) -> list[int]:
    """The pids `ctr tasks ps` lists: the shim's answer to Pids."""
    lines = containerd.ctr("tasks", "ps", container_id).stdout.splitlines()[1:]
    return [int(line.split()[0]) for line in lines]


def stop(containerd: PrivateContainerd, container_id: str) -> None:
    containerd.ctr("tasks", "kill", "--signal", "SIGKILL", container_id)
    assert wait_until(lambda: "STOPPED" in containerd.ctr("tasks", "ls").stdout, timeout=20), (
        containerd.ctr("tasks", "ls").stdout
    )
    containerd.ctr("tasks", "delete", container_id)
    containerd.ctr("containers", "delete", container_id)


def test_bootstrap_files_match_the_containerd_version(containerd: PrivateContainerd) -> None:
    containerd.ctr("run", "-d", "--runtime", RUNTIME, containerd.image, "boot", "sleep", "1000")
    bundle = containerd.bundle("boot")

    address = (bundle / "address").read_text()
    assert address.startswith("unix:///run/containerd/s/")  # plain: all versions reload from it
    if is_2x(containerd):  # containerd saved what `start` printed: the JSON of version 3
        bootstrap = json.loads((bundle / "bootstrap.json").read_text())
        assert bootstrap == {"version": 3, "address": address, "protocol": "ttrpc"}
    else:
        assert not (bundle / "bootstrap.json").exists()
    assert ps_pids(containerd, "boot") == [containerd.task_pid("boot")]
    stop(containerd, "boot")


def test_restart_reloads_the_shim_on_task_api_v3(containerd: PrivateContainerd) -> None:
    require_2x(containerd, "task API v3")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, containerd.image, "reload", "sleep", "1000")
    pid = containerd.task_pid("reload")
    offset = containerd.log_path.stat().st_size

    containerd.restart()

    reload_log = log_since(containerd, offset)
    connecting = [line for line in reload_log.splitlines() if "connecting to shim reload" in line]
    assert connecting and all("version=3" in line for line in connecting), reload_log
    assert "cleaning leaked shim process" not in reload_log  # its Pids call found the task
    assert containerd.task_pid("reload") == pid
    assert ps_pids(containerd, "reload") == [pid]
    stop(containerd, "reload")


def test_unknown_runtime_options_are_ignored(containerd: PrivateContainerd) -> None:
    # Not a runc runtime name, so ctr sends runtimeoptions.v1.Options{config_path}: on start's
    # stdin and in CreateTaskRequest.options. The Go runc shim fails start on it.
    offset = containerd.log_path.stat().st_size
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", "/etc/pyshim-none.toml",
        containerd.image, "opts", "echo", "ran",
    )  # fmt: skip

    assert result.stdout == "ran\n"
    assert "ignoring runtime options of type runtimeoptions.v1.Options" in log_since(
        containerd, offset
    )


def test_containerd_reads_the_runtime_info(containerd: PrivateContainerd) -> None:
    require_2x(containerd, "runtime introspection (`ctr plugins inspect-runtime`)")

    result = containerd.ctr("plugins", "inspect-runtime", "--runtime", RUNTIME)

    info = json.loads(result.stdout)
    assert info["Name"] == RUNTIME
    assert info["Features"]["ociVersionMin"], info  # from `runc features`
