"""The wasm backend's pieces that need no containerd: the module cache and the entrypoint
checks made at Create."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import wasmtime

from shim.runtimes.wasm import runner_request
from shim.ttrpc.errors import Code, TtrpcError
from shim.wasm.cache import ModuleCache

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

    request = json.loads(runner_request(process, rootfs, 1 << 20))

    assert request["module"] == os.path.join(rootfs, "app", "m.wasm")
    assert request["cwd"] == os.path.join(rootfs, "app")
    assert (request["args"], request["env"], request["memory_limit"]) == (
        ["m.wasm", "x"], ["A=1"], 1 << 20,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "process.args is empty"),
        (["/bin/sh"], "is not a WebAssembly module"),
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
        runner_request({"args": args}, rootfs, None)

    assert raised.value.code == Code.INVALID_ARGUMENT
    assert message in str(raised.value)
