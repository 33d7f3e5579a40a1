"""pyshim install / uninstall against private paths and a fake containerd (no root needed)."""

from __future__ import annotations

import datetime
import os
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shim.install import main, plan
from shim.install.dropin import MARKER, RUNSC_TOML, render_dropin, runsc_toml
from shim.install.mainconfig import add_import, import_matches
from shim.install.vmassets import plan_assets
from shim.kata import pvh
from shim.runtimes.registry import builtin_runtime_names
from shim.vm import assets, image
from shim.vm.assets import VmAssets
from shim.vm.image import GuestImage
from shim.vm.kernel import Kernel

CONTAINERD_16 = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1"
CONTAINERD_21 = "containerd github.com/containerd/containerd/v2 2.1.9+unknown "
CRI_V2 = "io.containerd.grpc.v1.cri"
CRI_V3 = "io.containerd.cri.v1.runtime"
SCRIPTS = Path(sysconfig.get_path("scripts"))

MAIN_CONFIG = """\
version = 2

# CRI settings
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
"""


class Node:
    """A containerd config, drop-in dir and bin dir under tmp_path, and the CLI against them."""

    def __init__(self, root: Path, version_line: str = CONTAINERD_16) -> None:
        self.root = root
        self.config = root / "etc" / "config.toml"
        self.drop_in_dir = root / "etc" / "conf.d"
        self.drop_in = self.drop_in_dir / "pyshim.toml"
        self.bin_dir = root / "bin"
        self.runsc_config = root / "etc" / "runsc.toml"
        self.pykata_config = root / "etc" / "pykata.toml"
        self.assets_dir = root / "vm"
        self.containerd = root / "containerd"
        self.containerd.write_text(f"#!/bin/sh\necho '{version_line}'\n")
        self.containerd.chmod(0o755)
        self.config.parent.mkdir()

    def args(self, command: str, *extra: str) -> list[str]:
        return [
            command,
            *extra,
            f"--containerd={self.containerd}",
            f"--config={self.config}",
            f"--drop-in-dir={self.drop_in_dir}",
            f"--bin-dir={self.bin_dir}",
            f"--runsc-config={self.runsc_config}",
            f"--pykata-config={self.pykata_config}",
            f"--assets-dir={self.assets_dir}",
        ]

    def run(self, command: str, *extra: str) -> int:
        return main(self.args(command, *extra))

    def snapshot(self) -> dict[str, str]:
        """Every file under root: its content, or where a symlink points."""
        found = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = path.read_text()
        return found


@pytest.fixture(autouse=True)
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


class FakeVm:
    """apt and the image builder faked: the kernel package `release` is "fetched" as two
    files, and the image's key is `key` (change it to make the image stale)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = "6.1.0-9-amd64"
        self.key = "k1"
        self.calls: list[str] = []
        monkeypatch.setattr(assets, "kernel_package", lambda: f"linux-image-{self.release}")
        monkeypatch.setattr(assets, "fetch_kernel", self.fetch_kernel)
        monkeypatch.setattr(pvh, "write", self.write_elf)
        monkeypatch.setattr(image, "image_key", lambda kernel, **_: self.key)
        monkeypatch.setattr(image, "build_image", self.build_image)
        monkeypatch.setattr(image, "current_image", lambda _: self.current)
        self.current: GuestImage | None = None

    def fetch_kernel(self, dest: Path) -> Kernel:
        self.calls.append("fetch")
        kernel = assets.unpacked_kernel(dest, f"linux-image-{self.release}")
        kernel.modules_dir.mkdir(parents=True)
        (kernel.modules_dir / "modules.order").write_text("")
        kernel.vmlinuz.parent.mkdir()
        kernel.vmlinuz.write_text("vmlinuz")
        return kernel

    def write_elf(self, kernel: Kernel) -> int:
        self.calls.append("pvh")
        kernel.vmlinuz.with_name(f"vmlinux-{kernel.release}").write_text("elf")
        return 0

    def build_image(self, images_dir: Path, kernel: Kernel) -> GuestImage:
        self.calls.append("build")
        built = GuestImage(images_dir / f"guest-{self.key}.erofs", self.key, kernel.release)
        images_dir.mkdir(exist_ok=True)
        built.path.write_text("")
        self.current = built
        return built


@pytest.fixture(autouse=True)
def vm(monkeypatch: pytest.MonkeyPatch) -> FakeVm:
    return FakeVm(monkeypatch)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def imported(node: Node) -> Node:
    node.config.write_text(f'version = 2\nimports = ["{node.drop_in_dir}/*.toml"]\n')
    return node


def runtimes(text: str, plugin: str) -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(text)["plugins"][plugin]["containerd"]["runtimes"]
    return table


def test_builtin_backends() -> None:
    assert builtin_runtime_names() == ("pyrunc", "pyrunsc", "pywasm", "pykata")


@pytest.mark.parametrize(
    ("version", "plugin", "header"),
    [
        (2, CRI_V2, '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyrunsc.options]'),
        (3, CRI_V3, "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.pyrunsc.options]"),
    ],
)
def test_drop_in_text(version: int, plugin: str, header: str) -> None:
    text = render_dropin(builtin_runtime_names(), version, {"pyrunsc": Path("/etc/r.toml")})
    assert text.startswith(MARKER)
    assert f"\nversion = {version}\n" in text
    assert header in text.splitlines()
    assert tomllib.loads(text)["version"] == version
    assert runtimes(text, plugin) == {
        "pyrunc": {"runtime_type": "io.containerd.pyrunc.v1"},
        "pyrunsc": {
            "runtime_type": "io.containerd.pyrunsc.v1",
            "options": {"TypeUrl": "io.containerd.runsc.v1.options", "ConfigPath": "/etc/r.toml"},
        },
        "pywasm": {"runtime_type": "io.containerd.pywasm.v1"},
        "pykata": {"runtime_type": "io.containerd.pykata.v1"},
    }


def test_drop_in_for_containerd_1_repeats_the_cri_section() -> None:
    base = {
        "sandbox_image": 'odd "quoted"\\name\n',
        "max_conf_num": 1,
        "ratio": 0.5,
        "enabled": True,
        "since": datetime.date(2024, 1, 2),
        "list": ["a", {"inline key": [1, 2]}],
        "cni": {"bin_dir": "/usr/lib/cni"},
        "empty": {},
    }
    parsed = tomllib.loads(render_dropin(["pyrunc"], 2, {}, base))
    cri = parsed["plugins"][CRI_V2]
    assert cri.pop("containerd") == {
        "runtimes": {
            "runc": {"runtime_type": "io.containerd.runc.v2"},  # 1.x's default, kept
            "pyrunc": {"runtime_type": "io.containerd.pyrunc.v1"},
        }
    }
    assert cri == base


def test_install_then_again_changes_nothing(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    imported(node)
    assert node.run("install") == 0
    first = capsys.readouterr().out
    assert "restart containerd 1.6 to load the handlers: systemctl restart containerd" in first
    for backend in builtin_runtime_names():
        name = f"containerd-shim-{backend}-v1"
        assert os.readlink(node.bin_dir / name) == str(SCRIPTS / name)
    text = node.drop_in.read_text()
    assert set(runtimes(text, CRI_V2)) == {"runc", "pyrunc", "pyrunsc", "pywasm", "pykata"}
    assert "[runsc_config]" in node.runsc_config.read_text()
    installed = node.snapshot()

    assert node.run("install") == 0
    second = capsys.readouterr().out.splitlines()
    assert node.snapshot() == installed
    assert second[-1] == "nothing changed"
    assert all(line.startswith("unchanged: ") for line in second[:-1])


def test_containerd_2_gets_version_3(tmp_path: Path) -> None:
    node = Node(tmp_path, CONTAINERD_21)
    node.config.write_text(f"version = 3\nimports = ['{node.drop_in_dir}/*.toml']\n")
    assert node.run("install") == 0
    text = node.drop_in.read_text()
    assert tomllib.loads(text)["version"] == 3
    assert set(runtimes(text, CRI_V3)) == {"pyrunc", "pyrunsc", "pywasm", "pykata"}


def test_containerd_2_with_a_version_2_config_gets_version_2(tmp_path: Path) -> None:
    node = imported(Node(tmp_path, CONTAINERD_21))
    assert node.run("install") == 0
    text = node.drop_in.read_text()
    assert tomllib.loads(text)["version"] == 2
    # 2.x merges deeply
    assert set(runtimes(text, CRI_V2)) == {"pyrunc", "pyrunsc", "pywasm", "pykata"}


def test_missing_import_stops_before_any_change(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.config.write_text(MAIN_CONFIG)
    before = node.snapshot()
    assert node.run("install") == 1
    err = capsys.readouterr().err
    assert f'imports = ["{node.drop_in_dir}/*.toml"]' in err
    assert "Traceback" not in err
    assert node.snapshot() == before


def test_missing_config_stops_without_add_import(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert node.run("install") == 1
    assert "does not exist" in capsys.readouterr().err
    assert node.snapshot() == {str(node.containerd): node.containerd.read_text()}


def test_add_import_backs_up_and_inserts_one_line(node: Node) -> None:
    node.config.write_text(MAIN_CONFIG)
    assert node.run("install", "--add-import") == 0
    assert (node.config.parent / "config.toml.pyshim-backup").read_text() == MAIN_CONFIG
    line = f'imports = ["{node.drop_in_dir}/*.toml"]\n\n'
    edited = node.config.read_text()
    assert edited == MAIN_CONFIG.replace("# CRI settings", line + "# CRI settings")
    # Carried into the drop-in: on 1.x its CRI section replaces the main config's.
    cri = tomllib.loads(node.drop_in.read_text())["plugins"][CRI_V2]
    assert cri["sandbox_image"] == "registry.k8s.io/pause:3.9"

    node.config.write_text(MAIN_CONFIG)  # a second edit keeps the first backup
    assert node.run("install", "--add-import") == 0
    assert len(list(node.config.parent.glob("config.toml.pyshim-backup.*"))) == 1


def test_add_import_creates_a_missing_config(node: Node) -> None:
    assert node.run("install", "--add-import") == 0
    assert node.config.read_text() == f'version = 2\nimports = ["{node.drop_in_dir}/*.toml"]\n'


def test_dry_run_changes_nothing(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.config.write_text(MAIN_CONFIG)
    before = node.snapshot()
    assert node.run("install", "--dry-run", "--add-import") == 0
    out = capsys.readouterr().out
    assert node.snapshot() == before
    assert f"would write {node.drop_in}" in out
    assert f"would create symlink {node.bin_dir}/containerd-shim-pyrunc-v1 -> " in out
    assert '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pywasm]' in out
    assert f'+imports = ["{node.drop_in_dir}/*.toml"]' in out
    assert out.endswith("dry run: nothing changed\n")


def test_a_foreign_file_at_a_link_is_refused(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    imported(node)
    node.bin_dir.mkdir()
    (node.bin_dir / "containerd-shim-pyrunsc-v1").write_text("someone else's shim")
    before = node.snapshot()
    assert node.run("install") == 1
    assert f"{node.bin_dir}/containerd-shim-pyrunsc-v1 exists" in capsys.readouterr().err
    assert node.snapshot() == before


def test_a_foreign_drop_in_is_refused(node: Node) -> None:
    imported(node)
    node.drop_in_dir.mkdir()
    node.drop_in.write_text("version = 2\n")
    assert node.run("install") == 1
    assert node.drop_in.read_text() == "version = 2\n"


def test_uninstall_removes_only_ours(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    imported(node)
    assert node.run("install") == 0
    foreign = node.bin_dir / "containerd-shim-pywasm-v1"
    foreign.unlink()
    foreign.symlink_to("/usr/bin/true")
    config = node.config.read_text()
    assert node.run("uninstall") == 0
    out = capsys.readouterr().out
    assert not node.drop_in.exists()
    assert sorted(p.name for p in node.bin_dir.iterdir()) == ["containerd-shim-pywasm-v1"]
    assert os.readlink(foreign) == "/usr/bin/true"
    assert node.runsc_config.exists() and node.config.read_text() == config
    assert f"left in place: {node.runsc_config}" in out
    assert f"left in place: the imports entry in {node.config}" in out

    node.drop_in.write_text("version = 2\n")  # not ours
    assert node.run("uninstall") == 0
    assert node.drop_in.exists()
    assert "nothing changed" in capsys.readouterr().out


def test_another_cri_drop_in_is_refused_on_containerd_1(node: Node) -> None:
    imported(node)
    node.drop_in_dir.mkdir()
    (node.drop_in_dir / "registry.toml").write_text(f'[plugins."{CRI_V2}".registry]\n')
    assert node.run("install") == 1
    assert not node.drop_in.exists()


def test_errors_are_messages(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    imported(node)
    node.containerd.write_text("#!/bin/sh\necho 'containerd version unknown'\n")
    assert node.run("install") == 1
    assert "cannot tell containerd's version" in capsys.readouterr().err

    node.containerd.unlink()
    assert node.run("install") == 1
    assert f"cannot run {node.containerd} --version" in capsys.readouterr().err


def test_unwritable_paths_stop_before_any_change(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    imported(node)
    blocker = node.root / "file"
    blocker.write_text("")
    before = node.snapshot()
    assert main([*node.args("install"), f"--bin-dir={blocker}/bin"]) == 1
    assert f"{blocker} is not a directory" in capsys.readouterr().err
    assert node.snapshot() == before


def test_root_is_needed_except_for_dry_run(
    node: Node, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    imported(node)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert node.run("install") == 1
    assert "run it as root" in capsys.readouterr().err
    assert node.run("install", "--dry-run") == 0


@pytest.mark.parametrize(
    ("entry", "matches"),
    [
        ("/etc/containerd/conf.d/*.toml", True),
        ("/etc/containerd/conf.d/pyshim.toml", True),
        ("conf.d/*.toml", True),  # relative to the config's directory
        ("/etc/containerd/conf.d//./*.toml", True),  # cleaned like Go's filepath.Clean
        ("/etc/containerd/*.toml", False),  # * does not cross /
        ("/etc/containerd/*/*.toml", True),
        ("/etc/containerd/conf.d/*.conf", False),
        ("/etc/containerd/conf.d/pyshim.tom?", False),  # no * -> taken literally
    ],
)
def test_import_matching(entry: str, matches: bool) -> None:
    config = Path("/etc/containerd/config.toml")
    assert import_matches(entry, config, Path("/etc/containerd/conf.d/pyshim.toml")) is matches


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version = 2\n[plugins]\n", 'version = 2\nimports = ["/d/*.toml"]\n\n[plugins]\n'),
        ("version = 2\n# cri\n[x]\n", 'version = 2\nimports = ["/d/*.toml"]\n\n# cri\n[x]\n'),
        ("version = 2", 'version = 2\nimports = ["/d/*.toml"]\n'),
        ("version = 2\r\n[x]\r\n", 'version = 2\r\nimports = ["/d/*.toml"]\r\n\r\n[x]\r\n'),
        ("imports = []\n[x]\n", 'imports = ["/d/*.toml"]\n[x]\n'),
        (
            'imports = [\n  \'/a/*.toml\', # a ] in a comment\n  "/b\\"]",\n]\n',
            'imports = [\n  \'/a/*.toml\', # a ] in a comment\n  "/b\\"]", "/d/*.toml",\n]\n',
        ),
    ],
)
def test_add_import_edits_minimally(text: str, expected: str) -> None:
    assert add_import(text, "/d/*.toml") == expected


def test_add_import_refuses_an_unsafe_edit() -> None:
    with pytest.raises(ValueError, match="not written as an array"):
        add_import('imports = "a"\n', "/d/*.toml")


def test_containerd_1_refuses_a_config_without_a_version_line(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """No `version` line is config version 1, which containerd 1.x cannot combine with a
    version 2 drop-in: it would no longer start."""
    node.config.write_text(f'imports = ["{node.drop_in_dir}/*.toml"]\n')
    before = node.snapshot()
    assert node.run("install", "--add-import") == 1
    assert "version 1" in capsys.readouterr().err
    assert node.snapshot() == before


def test_the_starter_runsc_toml_keeps_the_netstack_and_documents_the_fallback() -> None:
    # runsc's defaults but for seccomp, which it enforces only when told; no fallback
    assert tomllib.loads(RUNSC_TOML) == {"runsc_config": {"oci-seccomp": "true"}}
    for choice in ("host", "none"):
        line = f'#   network_fallback = "{choice}"'
        assert line in RUNSC_TOML
        # Uncommented where it stands (above the table), it is the top-level key the shim reads.
        chosen = RUNSC_TOML.replace(line, line.replace("#   ", "", 1))
        assert tomllib.loads(chosen)["network_fallback"] == choice


def test_the_runsc_toml_enforces_seccomp_if_the_nodes_runsc_can(
    node: Node, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    imported(node)
    monkeypatch.setattr(plan, "runsc_flags", lambda: {"network", "oci-seccomp"})
    assert node.run("install") == 0
    assert tomllib.loads(node.runsc_config.read_text())["runsc_config"]["oci-seccomp"] == "true"
    capsys.readouterr()

    # A runsc without the flag would refuse every command given it: the line stays a comment.
    node.runsc_config.unlink()
    monkeypatch.setattr(plan, "runsc_flags", lambda: {"network"})
    assert node.run("install") == 0
    assert tomllib.loads(node.runsc_config.read_text()) == {"runsc_config": {}}
    assert '# oci-seccomp = "true"' in node.runsc_config.read_text()
    assert "seccomp profiles are not enforced" in capsys.readouterr().out

    # No runsc on the node yet: one installed later has the flag.
    node.runsc_config.unlink()
    monkeypatch.setattr(plan, "runsc_flags", lambda: None)
    assert node.run("install") == 0
    assert node.runsc_config.read_text() == runsc_toml()


def test_runsc_flags_are_read_from_runsc_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shim.install.runsc import runsc_flags

    fake = tmp_path / "runsc"
    # runsc prints the flags on stderr, Go's flag package style.
    fake.write_text(
        '#!/bin/sh\n[ "$1" = flags ] || exit 2\n'
        "printf '  -network value\\n    \\tspecifies...\\n' >&2\n"
        "printf '  -oci-seccomp\\n    \\tEnables...\\n' >&2\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert runsc_flags() == {"network", "oci-seccomp"}
    assert runsc_flags("no-such-runsc") is None


def test_vm_assets_are_fetched_and_built_once(
    tmp_path: Path, vm: FakeVm, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "vm"
    assert main(["assets", f"--assets-dir={root}"]) == 0
    kernel_dir, release = root / "kernel", vm.release
    assert capsys.readouterr().out.splitlines() == [
        f"fetched kernel {release} in {kernel_dir}",
        f"wrote the kernel's uncompressed PVH image {kernel_dir}/boot/vmlinux-{release}",
        f"built guest image k1 in {root}/images",
        f"the VM's assets are ready in {root}",
    ]
    assert vm.calls == ["fetch", "pvh", "build"]

    assert main(["assets", f"--assets-dir={root}"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"unchanged: kernel {release} in {kernel_dir}",
        f"unchanged: the kernel's PVH image {kernel_dir}/boot/vmlinux-{release}",
        "unchanged: guest image k1 up to date",
        "nothing changed",
    ]
    assert vm.calls == ["fetch", "pvh", "build"]


def test_a_changed_image_key_rebuilds_and_removes_the_stale_image(
    tmp_path: Path, vm: FakeVm, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "vm"
    assert main(["assets", f"--assets-dir={root}"]) == 0
    vm.key = "k2"  # a new runc, interpreter, package version ...
    steps = plan_assets(VmAssets(root))
    assert steps[-1].todo == f"build guest image k2 in {root}/images"
    capsys.readouterr()
    assert main(["assets", f"--assets-dir={root}"]) == 0
    out = capsys.readouterr().out
    assert f"built guest image k2 in {root}/images, removed 1 stale" in out
    assert sorted(p.name for p in (root / "images").iterdir()) == ["guest-k2.erofs"]


def test_a_new_kernel_package_is_fetched(tmp_path: Path, vm: FakeVm) -> None:
    root = tmp_path / "vm"
    assert main(["assets", f"--assets-dir={root}"]) == 0
    vm.release = "6.1.0-10-amd64"
    todos = [step.todo for step in plan_assets(VmAssets(root))]
    assert todos[0].startswith(f"fetch kernel 6.1.0-10-amd64 in {root}/kernel (apt-get download")
    assert todos[2] == "build the guest image for kernel 6.1.0-10-amd64"  # its key needs it


def test_vm_assets_dry_run_changes_nothing(
    tmp_path: Path, vm: FakeVm, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # no root needed
    root = tmp_path / "vm"
    assert main(["assets", "--dry-run", f"--assets-dir={root}"]) == 0
    out = capsys.readouterr().out
    assert not root.exists() and vm.calls == []
    assert "would fetch kernel" in out and out.endswith("dry run: nothing changed\n")
    assert main(["assets", f"--assets-dir={root}"]) == 1
    assert "run it as root (--dry-run shows what it would do)" in capsys.readouterr().err


def no_kernel() -> str:
    raise assets.AssetError("apt-cache knows no linux-image-amd64 (run apt-get update)")


def test_vm_asset_errors_are_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(assets, "kernel_package", no_kernel)
    assert main(["assets", f"--assets-dir={tmp_path}"]) == 1
    assert capsys.readouterr().err == (
        "pyshim assets: could not find the VM's kernel: apt-cache knows no linux-image-amd64"
        " (run apt-get update)\n"
    )


def test_install_sets_up_the_vm_assets_unless_told_not_to(
    node: Node, vm: FakeVm, capsys: pytest.CaptureFixture[str]
) -> None:
    imported(node)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assets, "kernel_package", no_kernel)
        assert node.run("install") == 1
        assert "(--no-vm-assets leaves them to `pyshim assets`)" in capsys.readouterr().err
        assert node.run("install", "--no-vm-assets") == 0
    assert vm.calls == [] and not node.assets_dir.exists()
    assert node.run("install") == 0
    assert vm.calls == ["fetch", "pvh", "build"]


def test_assets_elsewhere_get_a_pykata_toml_named_by_the_handler(node: Node) -> None:
    imported(node)
    assert node.run("install") == 0
    assert tomllib.loads(node.pykata_config.read_text()) == {
        "vm": {"assets_dir": str(node.assets_dir)}
    }
    assert runtimes(node.drop_in.read_text(), CRI_V2)["pykata"] == {
        "runtime_type": "io.containerd.pykata.v1",
        "options": {
            "TypeUrl": "io.containerd.pykata.v1.options",
            "ConfigPath": str(node.pykata_config),
        },
    }


def test_assets_in_the_default_place_need_no_pykata_toml(node: Node) -> None:
    imported(node)
    default = f"--assets-dir={VmAssets.DEFAULT_ROOT}"
    assert main([*node.args("install"), default, "--no-vm-assets"]) == 0
    assert not node.pykata_config.exists()
    pykata = runtimes(node.drop_in.read_text(), CRI_V2)["pykata"]
    assert pykata == {"runtime_type": "io.containerd.pykata.v1"}


def test_an_existing_pykata_toml_is_kept_and_must_agree(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    imported(node)
    node.pykata_config.write_text(f'[vm]\nvcpus = 2\nassets_dir = "{node.assets_dir}"\n')
    assert node.run("install") == 0
    assert f"unchanged: {node.pykata_config} exists (left as it is)" in capsys.readouterr().out
    assert "vcpus = 2" in node.pykata_config.read_text()

    node.pykata_config.write_text("[vm]\nvcpus = 2\n")  # the default assets_dir
    before = node.snapshot()
    assert node.run("install") == 1
    assert f"has pykata look for its assets in {VmAssets.DEFAULT_ROOT}, not in " in (
        capsys.readouterr().err
    )
    assert node.snapshot() == before


def test_uninstall_leaves_the_vm_assets_unless_purged(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    imported(node)
    assert node.run("install") == 0
    (node.assets_dir / "templates").mkdir()
    assert node.run("uninstall") == 0
    out = capsys.readouterr().out
    assert f"left in place: the VM assets in {node.assets_dir} (--purge-vm-assets" in out
    assert f"left in place: {node.pykata_config} (it may hold your settings)" in out
    assert (node.assets_dir / "kernel").is_dir()

    (node.assets_dir / "mine").write_text("not pyshim's")
    assert node.run("uninstall", "--purge-vm-assets") == 0
    assert f"removed the VM assets in {node.assets_dir}" in capsys.readouterr().out
    assert [p.name for p in node.assets_dir.iterdir()] == ["mine"]
