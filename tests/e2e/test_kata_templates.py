"""pykata's VM templates under ctr: the first VM of a machine leaves one, later VMs are restored
from it, a template that cannot be restored gives a cold boot with the reason in the shim's log,
and `pyshim templates` lists and removes them. The assets are the harness's (kernel and image,
linked), the templates a directory of this test's own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from harness import REPO, VENV_BIN, PrivateContainerd
from vm_support import cold_boot_reasons, require_vm, vm_starts

from shim.vm.templates import TemplateStore

RUNTIME = "io.containerd.pykata.v1"
BOOT = 240
ASSETS = REPO / "var" / "vm-assets"

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", autouse=True)
def vm_capable() -> None:
    require_vm()


def run_echo(containerd: PrivateContainerd, config: Path, name: str) -> str:
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", str(config),
        containerd.image, name, "echo", name, timeout=BOOT,
    )  # fmt: skip
    return str(result.stdout)


def how_booted(containerd: PrivateContainerd) -> list[str]:
    return vm_starts(containerd.log_path.read_text())


def why_cold(containerd: PrivateContainerd) -> list[str]:
    return cold_boot_reasons(containerd.log_path.read_text())


def pyshim(*args: str) -> str:
    return subprocess.run(
        [VENV_BIN / "pyshim", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def test_templates_are_made_restored_replaced_when_broken_and_removed(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    for shared in ("kernel", "images"):
        (assets / shared).symlink_to(ASSETS / shared)
    config = tmp_path / "pykata.toml"
    config.write_text(f'[vm]\nassets_dir = "{assets}"\n')
    store = TemplateStore(assets / "templates")
    before = len(how_booted(containerd))

    assert run_echo(containerd, config, "first") == "first\n"
    made = store.list()
    assert len(made) == 1, why_cold(containerd)
    (template,) = made
    assert run_echo(containerd, config, "second") == "second\n"
    assert how_booted(containerd)[before:] == ["restored", "restored"], why_cold(containerd)

    template.state.write_bytes(b"not QEMU's migration stream")
    assert run_echo(containerd, config, "third") == "third\n"
    assert how_booted(containerd)[before:] == ["restored", "restored", "booted"]
    assert f"template {template.key}: " in containerd.log_path.read_text()
    assert "booting cold" in containerd.log_path.read_text()

    listed = pyshim("templates", "list", "--assets-dir", str(assets))
    assert template.key in listed
    pyshim("templates", "remove", "--assets-dir", str(assets), "--all")
    assert store.list() == []
    assert template.key not in pyshim("templates", "list", "--assets-dir", str(assets))
