"""The wasm backend's pieces that need no containerd: the module cache, the entrypoint checks
made at Create, which backend runs a CRI pod's containers, and the cgroup limits it writes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import wasmtime

from shim.runtimes.base import ContainerConfig, ProcessStdio, ShimContext
from shim.runtimes.runc import RuncContainer, RuncRuntime
from shim.runtimes.wasm import (
    WasmContainer,
    WasmRuntime,
    is_pod_sandbox,
    record_in_pod,
    runner_request,
)
from shim.sys import cgroup_limits
from shim.sys.cgroup_limits import cpu_weight, refuse_unapplied, unapplied
from shim.sys.cgroups import Cgroup
from shim.sys.reaper import Reaper
from shim.ttrpc.errors import Code, TtrpcError
from shim.wasm.cache import ModuleCache
from shim.wasm.cgroup import ContainerCgroup

pytestmark = pytest.mark.timeout(60)


def write_module(path: Path, exit_code: int) -> Path:
    path.write_bytes(
        wasmtime.wat2wasm(f'(module (func (export "f") (result i32) i32.const {exit_code}))')
    )
    return path


def call_f(module: wasmtime.Module, engine: wasmtime.Engine) -> int:
    store = wasmtime.Store(engine)
    instance = wasmtime.Instance(store, module, [])
    f = instance.exports(store)["f"]
    assert isinstance(f, wasmtime.Func)
    result = f(store)
    assert isinstance(result, int)
    return result


def test_second_load_is_a_hit_of_the_same_entry(tmp_path: Path) -> None:
    engine = wasmtime.Engine()
    cache = ModuleCache(str(tmp_path / "cache"), max_bytes=1 << 30)
    module = write_module(tmp_path / "m.wasm", 7)

    first = cache.load(engine, str(module))
    second = cache.load(engine, str(module))

    assert (first.hit, second.hit) == (False, True)
    assert first.entry == second.entry
    assert call_f(second.module, engine) == 7
    assert os.stat(tmp_path / "cache").st_mode & 0o077 == 0
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(first.entry).name]


def test_a_corrupt_entry_is_compiled_again(tmp_path: Path) -> None:
    engine = wasmtime.Engine()
    cache = ModuleCache(str(tmp_path / "cache"), max_bytes=1 << 30)
    module = write_module(tmp_path / "m.wasm", 3)
    entry = cache.load(engine, str(module)).entry
    Path(entry).write_bytes(b"not a compiled module")

    again = cache.load(engine, str(module))

    assert not again.hit
    assert call_f(again.module, engine) == 3
    assert cache.load(engine, str(module)).hit


def test_the_cache_stays_under_its_bound_dropping_the_oldest(tmp_path: Path) -> None:
    engine = wasmtime.Engine()
    probe = ModuleCache(str(tmp_path / "probe"), max_bytes=1 << 30)
    size = os.stat(probe.load(engine, str(write_module(tmp_path / "p.wasm", 0))).entry).st_size
    cache = ModuleCache(str(tmp_path / "cache"), max_bytes=2 * size + size // 2)
    entries = []
    for code in range(1, 4):
        entries.append(cache.load(engine, str(write_module(tmp_path / f"{code}.wasm", code))).entry)
        os.utime(entries[-1], (code, code))  # distinct ages: entry 1 is the oldest

    cache.load(engine, str(write_module(tmp_path / "4.wasm", 4)))

    left = {str(p) for p in (tmp_path / "cache").glob("*.cwasm")}
    assert entries[0] not in left and entries[1] not in left
    assert entries[2] in left and len(left) == 2


def rootfs_with(tmp_path: Path, files: dict[str, bytes]) -> str:
    rootfs = tmp_path / "rootfs"
    for name, data in files.items():
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).write_bytes(data)
    return str(rootfs)


def test_request_resolves_the_module_and_cwd_inside_the_rootfs(tmp_path: Path) -> None:
    rootfs = rootfs_with(tmp_path, {"app/m.wasm": b"\0asm\1\0\0\0"})
    process = {"args": ["m.wasm", "x"], "cwd": "/app", "env": ["A=1"]}

    request = json.loads(runner_request(process, rootfs))

    assert request["module"] == os.path.join(rootfs, "app", "m.wasm")
    assert request["cwd"] == os.path.join(rootfs, "app")
    assert (request["args"], request["env"]) == (["m.wasm", "x"], ["A=1"])


def test_a_bare_entrypoint_name_is_looked_for_on_path(tmp_path: Path) -> None:
    rootfs = rootfs_with(tmp_path, {"opt/bin/m.wasm": b"\0asm\1\0\0\0"})
    process = {"args": ["m.wasm"], "env": ["PATH=/usr/bin:/opt/bin"]}

    request = json.loads(runner_request(process, rootfs))

    assert request["module"] == os.path.join(rootfs, "opt", "bin", "m.wasm")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "process.args is empty"),
        (["/bin/sh"], "is not a WebAssembly module"),
        (["sh"], "entrypoint sh is not a WebAssembly module"),  # found on PATH
        (["/missing.wasm"], "not in the image"),
        (["/../outside.wasm"], "outside the container's rootfs"),
        (["/link.wasm"], "outside the container's rootfs"),
    ],
)
def test_request_refuses_what_is_not_a_module_in_the_rootfs(
    tmp_path: Path, args: list[str], message: str
) -> None:
    rootfs = rootfs_with(tmp_path, {"bin/sh": b"\x7fELF..."})
    (tmp_path / "outside.wasm").write_bytes(b"\0asm\1\0\0\0")
    os.symlink(tmp_path / "outside.wasm", os.path.join(rootfs, "link.wasm"))

    with pytest.raises(TtrpcError) as raised:
        runner_request({"args": args, "env": ["PATH=/usr/bin:/bin"]}, rootfs)

    assert raised.value.code == Code.INVALID_ARGUMENT
    assert message in str(raised.value)


CONTAINER_TYPE = "io.kubernetes.cri.container-type"


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({CONTAINER_TYPE: "sandbox", "io.kubernetes.cri.sandbox-id": "p"}, True),
        ({CONTAINER_TYPE: "container", "io.kubernetes.cri.sandbox-id": "p"}, False),
        ({"io.kubernetes.cri.sandbox-id": "p"}, False),
        (None, False),
    ],
)
def test_only_cris_sandbox_container_is_the_pod_sandbox(
    annotations: dict[str, str] | None, expected: bool
) -> None:
    assert is_pod_sandbox({"annotations": annotations}) is expected


def bundle_with(tmp_path: Path, name: str, container_type: str | None) -> str:
    bundle = tmp_path / name
    bundle.mkdir()
    annotations = {CONTAINER_TYPE: container_type} if container_type else {}
    (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    return str(bundle)


def test_the_pause_container_runs_on_runc_and_app_containers_as_modules(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        runtime = WasmRuntime(ShimContext("k8s.io", "io.containerd.pywasm.v1", Reaper(loop, False)))
        stdio = ProcessStdio(None, None, None, terminal=False)

        def container(name: str, container_type: str | None) -> object:
            bundle = bundle_with(tmp_path, name, container_type)
            return runtime.container(ContainerConfig(name, bundle, stdio, options=None))

        assert isinstance(container("pause", "sandbox"), RuncContainer)
        assert isinstance(container("app", "container"), WasmContainer)
        assert isinstance(container("ctr", None), WasmContainer)
    finally:
        loop.close()


def test_delete_cleans_up_each_kind_its_own_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cleaned: list[str] = []

    def runc_cleanup(namespace: str, bundle: str, container_id: str) -> int:
        cleaned.append(f"runc {container_id}")
        return 42

    def remove_cgroup(self: ContainerCgroup) -> None:
        cleaned.append(f"cgroup {self.cgroup.directories()[0].rsplit('/', 1)[-1]}")

    monkeypatch.setattr(RuncRuntime, "cleanup", runc_cleanup)
    monkeypatch.setattr(ContainerCgroup, "remove", remove_cgroup)
    pause = bundle_with(tmp_path, "pause", "sandbox")
    app = bundle_with(tmp_path, "app", "container")
    (Path(app) / "init.pid").write_text("7")

    assert WasmRuntime.cleanup("k8s.io", pause, "pause") == 42
    assert WasmRuntime.cleanup("k8s.io", app, "app") == 7
    assert cleaned == ["runc pause", "cgroup app"]


def test_the_pods_cleanup_removes_the_module_cgroups_its_pause_bundle_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """containerd 2.x runs `delete` after a shim's death for the pause alone."""
    cleaned: list[str] = []
    monkeypatch.setattr(RuncRuntime, "cleanup", lambda *_: cleaned.append("runc") or 42)
    monkeypatch.setattr(ContainerCgroup, "remove", lambda self: cleaned.append(self._path))
    pause = bundle_with(tmp_path, "pause", "sandbox")
    app = {"annotations": {CONTAINER_TYPE: "container", "io.kubernetes.cri.sandbox-id": "pause"}}
    record_in_pod(app, str(tmp_path / "a1"), "/pod/a1")
    record_in_pod(app, str(tmp_path / "a2"), "/pod/a2")
    record_in_pod({"annotations": {}}, str(tmp_path / "ctr"), "/default/ctr")  # no pod

    assert WasmRuntime.cleanup("k8s.io", pause, "pause") == 42
    assert cleaned == ["runc", "/pod/a1", "/pod/a2"]


@pytest.mark.parametrize(("shares", "weight"), [(2, 1), (1024, 39), (262144, 10000), (1, 1)])
def test_cpu_shares_map_to_weight_as_runc_maps_them(shares: int, weight: int) -> None:
    assert cpu_weight(shares) == weight


@pytest.fixture
def v1_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ContainerCgroup:
    """A v1 ContainerCgroup over plain files in tmp_path."""
    dirs = {c: str(tmp_path / c) for c in ("memory", "cpu", "pids")}
    for directory in dirs.values():
        os.mkdir(directory)
    monkeypatch.setattr(Cgroup, "at", classmethod(lambda cls, path: Cgroup(1, dirs)))
    return ContainerCgroup("/pod/c")


def written(tmp_path: Path, name: str) -> str:
    controller = name.split(".", 1)[0]
    return (tmp_path / controller / name).read_text()


@pytest.mark.parametrize(
    ("current", "limit", "order"),
    [
        (32 << 20, 96 << 20, ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]),
        (96 << 20, 32 << 20, ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]),
    ],
)
def test_v1_memory_and_swap_are_written_in_an_order_the_kernel_accepts(
    tmp_path: Path,
    v1_cgroup: ContainerCgroup,
    monkeypatch: pytest.MonkeyPatch,
    current: int,
    limit: int,
    order: list[str],
) -> None:
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(current))
    names: list[str] = []
    write = cgroup_limits._write

    def recording(cgroup: Cgroup, controller: str, name: str, value: str) -> None:
        names.append(name)
        write(cgroup, controller, name, value)

    monkeypatch.setattr(cgroup_limits, "_write", recording)

    v1_cgroup.set_resources({"memory": {"limit": limit, "swap": limit}})

    assert names == order
    assert written(tmp_path, "memory.limit_in_bytes") == str(limit)


def test_v1_cpu_shares_and_quota_are_written(tmp_path: Path, v1_cgroup: ContainerCgroup) -> None:
    v1_cgroup.set_resources({"cpu": {"shares": 512, "quota": 50000, "period": 100000}})

    assert written(tmp_path, "cpu.shares") == "512"
    assert written(tmp_path, "cpu.cfs_quota_us") == "50000"
    assert written(tmp_path, "cpu.cfs_period_us") == "100000"


def test_update_settings_that_are_not_written_are_refused_by_name() -> None:
    # docker sends every field; zero and empty ones are not settings.
    docker_update = {
        "cpu": {"shares": 512, "quota": 0, "period": 0, "cpus": "", "mems": ""},
        "memory": {"limit": 50331648},
        "pids": {"limit": 40},
        # CRI restates the spec's device list with every update.
        "devices": [{"allow": False, "access": "rwm"}],
    }
    assert unapplied(docker_update) == []
    refuse_unapplied(docker_update, "pywasm")
    cpuset = {"cpu": {"cpus": "0"}, "blockIO": {"weight": 300}, "memory": {"reservation": 1}}
    assert unapplied(cpuset) == ["cpu.cpus", "blockIO.weight", "memory.reservation"]
    with pytest.raises(TtrpcError) as raised:
        refuse_unapplied(cpuset, "pywasm")
    assert raised.value.code == Code.UNIMPLEMENTED
    assert "pywasm cannot set cpu.cpus, blockIO.weight, memory.reservation" in str(raised.value)
