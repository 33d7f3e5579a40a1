"""The VM assets: the kernel's fetching (apt faked on PATH), the template store, and
`pyshim templates`."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from shim.install import main
from shim.vm.assets import AssetError, VmAssets, fetch_kernel
from shim.vm.templates import INFO, TemplateStore, template_key

FAKE_APT = {
    "apt-cache": 'echo "linux-image-amd64"; echo "  Depends: linux-image-$FAKE_RELEASE"',
    "apt-get": 'echo "apt-get $*" >>"$FAKE_LOG"\n'
    '[ -z "$FAKE_APT_FAILS" ] || { echo "E: $FAKE_APT_FAILS"; exit 100; }\n'
    'touch "$3_1_amd64.deb"',
    "dpkg-deb": 'mkdir -p "$3/boot" "$3/lib/modules/$FAKE_RELEASE"\n'
    'echo vmlinuz >"$3/boot/vmlinuz-$FAKE_RELEASE"\n'
    'touch "$3/lib/modules/$FAKE_RELEASE/modules.order"',
}


@pytest.fixture
def apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """apt-cache, apt-get download and dpkg-deb -x faked; the log of apt-get's runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_APT.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "apt.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_RELEASE", "6.1.0-9-amd64")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def test_the_assets_layout() -> None:
    vm = VmAssets(VmAssets.DEFAULT_ROOT)
    assert (vm.kernel_dir, vm.images_dir, vm.templates_dir) == (
        Path("/var/lib/pyshim/vm/kernel"),
        Path("/var/lib/pyshim/vm/images"),
        Path("/var/lib/pyshim/vm/templates"),
    )


def test_fetch_kernel_unpacks_the_abi_package_once(tmp_path: Path, apt: Path) -> None:
    dest = tmp_path / "vm" / "kernel"
    kernel = fetch_kernel(dest)
    assert kernel.vmlinuz == dest / "boot" / "vmlinuz-6.1.0-9-amd64"
    assert kernel.modules_dir == dest / "lib" / "modules" / "6.1.0-9-amd64"
    assert kernel.vmlinuz.read_text() == "vmlinuz\n"
    assert fetch_kernel(dest) == kernel
    assert apt.read_text() == "apt-get -q download linux-image-6.1.0-9-amd64\n"


def test_a_new_kernel_replaces_the_old_whole(
    tmp_path: Path, apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "kernel"
    fetch_kernel(dest)
    monkeypatch.setenv("FAKE_RELEASE", "6.1.0-10-amd64")
    kernel = fetch_kernel(dest)
    assert kernel.release == "6.1.0-10-amd64"
    assert sorted(p.name for p in (dest / "boot").iterdir()) == ["vmlinuz-6.1.0-10-amd64"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apt.log", "bin", "kernel"]


def test_fetch_errors_name_the_cause(
    tmp_path: Path, apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_APT_FAILS", "Unable to locate package")
    with pytest.raises(AssetError, match=r"download linux-image-6\.1\.0-9-amd64 failed: E: Unable"):
        fetch_kernel(tmp_path / "kernel")
    assert not (tmp_path / "kernel").exists()

    monkeypatch.setenv("FAKE_RELEASE", "")  # the metapackage depends on no ABI package
    with pytest.raises(AssetError, match=r"knows no linux-image-amd64 \(run apt-get update\)"):
        fetch_kernel(tmp_path / "kernel")


def fill(directory: Path, **info: object) -> None:
    (directory / "memory").write_bytes(b"ram")
    (directory / "state").write_bytes(b"devices")
    (directory / INFO).write_text(json.dumps({"vcpus": 1, "memory_mb": 512, **info}))


def test_a_created_template_appears_whole(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    assert store.list() == [] and store.get("k") is None
    with store.creating("k") as directory:
        assert directory == tmp_path / "templates" / f".k.tmp-{os.getpid()}"
        fill(directory, accel="tcg")
        assert store.get("k") is None  # not before the block ends
    template = store.get("k")
    assert template is not None and store.list() == [template]
    assert template.directory == tmp_path / "templates" / "k"
    assert template.memory.read_bytes() == b"ram" and template.state.read_bytes() == b"devices"
    assert template.info["accel"] == "tcg"
    assert sorted(p.name for p in store.directory.iterdir()) == ["k", "k.lock"]


def test_a_second_creator_gets_none_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    with store.creating("k") as first:
        with store.creating("k") as second:
            assert first is not None and second is None
        with store.creating("other") as other:
            assert other is not None
    with store.creating("k") as again:  # released
        assert again is not None


@pytest.mark.parametrize("failing", [True, False])
def test_a_template_without_info_or_with_an_error_is_discarded(
    tmp_path: Path, failing: bool
) -> None:
    store = TemplateStore(tmp_path)
    raises = pytest.raises(RuntimeError) if failing else contextlib.nullcontext()
    with raises, store.creating("k") as directory:
        assert directory is not None
        (directory / "memory").write_bytes(b"ram")
        if failing:
            fill(directory)
            raise RuntimeError("QEMU failed")
    assert store.list() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.lock"]


def test_creating_replaces_a_template_and_sweeps_a_dead_creators_leftovers(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    with store.creating("k") as directory:
        assert directory is not None
        fill(directory, created=1)
    (tmp_path / ".k.tmp-999999").mkdir()  # a creator killed midway
    with store.creating("k") as directory:
        assert directory is not None
        fill(directory, created=2)
    template = store.get("k")
    assert template is not None and template.info["created"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.lock"]


def test_removal_spares_the_open_files_of_running_clones(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    for key in ("a", "b"):
        with store.creating(key) as directory:
            assert directory is not None
            fill(directory)
    template = store.get("a")
    assert template is not None
    with template.memory.open("rb") as memory:
        assert store.remove("a") and not store.remove("a")
        assert memory.read() == b"ram"  # the unlinked inode lives while it is open
    assert [t.key for t in store.list()] == ["b"]
    assert store.remove_all() == ["b"] and store.list() == []
    with pytest.raises(ValueError, match="not a template key"):
        store.remove("../kernel")


def test_template_keys_digest_the_inputs_in_any_order() -> None:
    key = template_key(vcpus=1, memory_mb=512, image="k1")
    assert key == template_key(image="k1", memory_mb=512, vcpus=1)
    assert key != template_key(vcpus=2, memory_mb=512, image="k1")
    assert len(key) == 24 and int(key, 16) >= 0


def test_pyshim_templates_lists_and_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assets_dir = f"--assets-dir={tmp_path}"
    assert main(["templates", "list", assets_dir]) == 0
    assert capsys.readouterr().out == f"no templates in {tmp_path}/templates\n"

    store = TemplateStore(VmAssets(tmp_path).templates_dir)
    created = time.mktime((2024, 5, 1, 12, 0, 0, 0, 0, -1))
    with store.creating("0123456789abcdef01234567") as directory:
        assert directory is not None
        fill(directory, vcpus=2, memory_mb=1024, accel="kvm", created=created)
        (directory / "memory").write_bytes(b"\1" * 8192)
    assert main(["templates", "list", assets_dir]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["KEY", "SIZE", "ACCEL", "CREATED", "DISK"]
    assert row.split()[:6] == [
        "0123456789abcdef01234567", "2", "vCPU/1024", "MB", "kvm", "2024-05-01"
    ]  # fmt: skip
    assert row.endswith(" KiB") and header.index("ACCEL") == row.index("kvm")

    assert main(["templates", "remove", assets_dir, "0123456789abcdef01234567"]) == 1
    assert "run it as root" in capsys.readouterr().err
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert main(["templates", "remove", assets_dir, "0123456789abcdef01234567", "gone"]) == 1
    out, err = capsys.readouterr()
    assert out == "removed template 0123456789abcdef01234567\n"
    assert err == f"pyshim templates remove: no template gone in {tmp_path}/templates\n"
    assert main(["templates", "remove", assets_dir, "--all"]) == 0
    assert capsys.readouterr().out == "no templates\n"
