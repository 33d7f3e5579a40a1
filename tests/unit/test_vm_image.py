"""shim.vm.image: the key, ldd's output, the applet links, the current record; and a real build
from this machine's kernel, mounted (or extracted) and run in a chroot laid out as the guest's."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.vm import image
from shim.vm.image import GuestImage, applet_links, library_destination, parse_ldd
from shim.vm.kernel import Kernel, find_kernel

REPO = Path(__file__).resolve().parents[2]
KERNEL_ROOT = REPO / "var" / "kernel"

LDD_ONE = """\
\tlinux-vdso.so.1 (0x00007ffd1a5f2000)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007efd23d4b000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007efd23b1f000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007efd23e3f000)
"""
LDD_MANY = """\
/usr/bin/python3.11:
\tlinux-vdso.so.1 (0x00007efd23e3d000)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007efd23d2c000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007efd23e3f000)
/bin/busybox:
\tnot a dynamic executable
/usr/sbin/runc:
\tlibseccomp.so.2 => /lib/x86_64-linux-gnu/libseccomp.so.2 (0x00007f980b913000)
"""


def test_parse_ldd_one_file_has_no_header_and_skips_the_vdso() -> None:
    assert parse_ldd(LDD_ONE, [Path("/usr/bin/python3.11")]) == {
        Path("/usr/bin/python3.11"): [
            Path("/lib/x86_64-linux-gnu/libm.so.6"),
            Path("/lib/x86_64-linux-gnu/libc.so.6"),
            Path("/lib64/ld-linux-x86-64.so.2"),
        ]
    }


def test_parse_ldd_many_files_splits_by_header_and_a_static_file_needs_nothing() -> None:
    paths = [Path("/usr/bin/python3.11"), Path("/bin/busybox"), Path("/usr/sbin/runc")]
    assert parse_ldd(LDD_MANY, paths) == {
        paths[0]: [Path("/lib/x86_64-linux-gnu/libz.so.1"), Path("/lib64/ld-linux-x86-64.so.2")],
        paths[1]: [],
        paths[2]: [Path("/lib/x86_64-linux-gnu/libseccomp.so.2")],
    }


def test_parse_ldd_a_library_not_found_is_an_error() -> None:
    with pytest.raises(FileNotFoundError, match=r"libgone\.so\.3"):
        parse_ldd("\tlibgone.so.3 => not found\n", [Path("/x")])


def test_library_destination_is_relative_to_usr_or_beside_a_wheels_package(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    (site / "cffi.libs").mkdir(parents=True)
    bundled = site / "cffi.libs" / "libffi-abc.so.8"
    assert library_destination(bundled, [site]) == "lib/pyshim/cffi.libs/libffi-abc.so.8"
    elsewhere = tmp_path / "pyenv" / "lib" / "libpython3.11.so.1.0"
    assert library_destination(elsewhere, [site]) == "lib/libpython3.11.so.1.0"
    libc = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert library_destination(libc, [site]) == "lib/x86_64-linux-gnu/libc.so.6"
    if os.path.realpath("/lib") == "/usr/lib":  # a merged /usr: /lib is usr/lib
        assert library_destination(Path("/lib/x86_64-linux-gnu/libc.so.6")) == (
            "lib/x86_64-linux-gnu/libc.so.6"
        )


def test_applet_links_never_clobber_a_placed_file() -> None:
    links = applet_links(["ls", "python3", "sh", "busybox"], {"bin/python3": Path("/x")})
    assert links == {"bin/ls": "busybox", "bin/sh": "busybox"}


def fake_kernel(root: Path) -> Kernel:
    modules = root / "lib" / "modules" / "6.1.0-test"
    modules.mkdir(parents=True)
    (modules / "modules.order").write_text("kernel/fs/erofs/erofs.ko\n")
    (root / "vmlinuz").write_bytes(b"kernel")
    return Kernel(root / "vmlinuz", modules)


def test_key_changes_when_an_input_file_changes(tmp_path: Path) -> None:
    source = tmp_path / "service.py"
    source.write_text("x = 1\n")
    kernel = fake_kernel(tmp_path)
    plan = image._Plan({"lib/pyshim/shim/agent/service.py": source}, {}, kernel)
    first = image._key(plan)
    assert image._key(plan) == first
    source.write_text("x = 2\n")
    changed = image._key(plan)
    assert changed != first
    renamed = image._Plan({"lib/pyshim/shim/agent/other.py": source}, {}, kernel)
    assert image._key(renamed) != changed
    (kernel.modules_dir / "modules.order").write_text("kernel/fs/erofs/erofs.ko\nveth.ko\n")
    assert image._key(plan) != changed


def test_current_image_and_stale_images(tmp_path: Path) -> None:
    assert image.current_image(tmp_path) is None
    keep = GuestImage(tmp_path / "guest-aa.erofs", "aa", "6.1.0-test", ("crun",))
    for name in ("guest-aa.erofs", "guest-bb.erofs", "guest-cc.erofs", "other.erofs"):
        (tmp_path / name).write_bytes(b"")
    record = {"path": keep.path.name, "key": keep.key, "release": keep.release}
    (tmp_path / "current.json").write_text(json.dumps(record))
    # Recorded before the guest runtime was a choice: runc was the only one.
    assert image.current_image(tmp_path) == GuestImage(keep.path, "aa", "6.1.0-test", ("runc",))
    (tmp_path / "current.json").write_text(json.dumps({**record, "runtimes": ["crun"]}))
    assert image.current_image(tmp_path) == keep
    assert image.remove_stale_images(tmp_path, keep) == [
        tmp_path / "guest-bb.erofs",
        tmp_path / "guest-cc.erofs",
    ]
    assert sorted(p.name for p in tmp_path.glob("*.erofs")) == ["guest-aa.erofs", "other.erofs"]
    keep.path.unlink()
    assert image.current_image(tmp_path) is None  # the file it names is gone


def test_runtimes_found_given_or_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "runc"
    binary.write_bytes(b"")
    assert image._runtime_files({"runc": binary}) == {"runc": binary}
    with pytest.raises(image.MissingTool, match="apt-get install crun"):
        image._runtime_files({"crun": tmp_path / "gone"})
    with pytest.raises(ValueError, match="no guest runtime 'youki'"):
        image._runtime_files({"youki": binary})
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(image.MissingTool, match=r"no crun or runc found.*apt-get install crun"):
        image._runtime_files(None)
    monkeypatch.setenv("PATH", str(tmp_path))
    binary.chmod(0o755)
    assert image._runtime_files(None) == {"runc": binary}  # what the host has


# -- a real build ---------------------------------------------------------------------------------


def _require_build() -> Kernel:
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("needs mkfs.erofs (apt-get install erofs-utils)")
    if os.geteuid() != 0:
        pytest.skip("needs root (mount, chroot)")
    if None in (shutil.which("runc"), shutil.which("crun")) or not Path("/bin/busybox").exists():
        pytest.skip("needs runc, crun and busybox-static")
    try:
        return find_kernel(KERNEL_ROOT)
    except FileNotFoundError:
        pytest.skip("needs the kernel under var/kernel (scripts/fetch-kernel)")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[GuestImage, Kernel]:
    kernel = _require_build()
    images = tmp_path_factory.mktemp("images")
    return image.build_image(images, kernel), kernel


def _erofs_mountable() -> bool:
    if "erofs" not in Path("/proc/filesystems").read_text().split():
        with contextlib.suppress(OSError):
            subprocess.run(["modprobe", "erofs"], capture_output=True)
    return "erofs" in Path("/proc/filesystems").read_text().split()


@contextlib.contextmanager
def guest_root(built_image: GuestImage, work: Path) -> Iterator[Path]:
    """A root laid out as the guest's: the image at /usr, the top-level symlinks, /proc, /dev."""
    root = work / "root"
    for name in ("usr", "proc", "dev", "tmp"):
        (root / name).mkdir(parents=True)
    for name in ("bin", "lib", "lib64", "sbin"):
        (root / name).symlink_to(f"usr/{name}")
    mounted: list[Path] = []
    try:
        if _erofs_mountable():
            source = ["-t", "erofs", "-o", "loop,ro", str(built_image.path)]
            subprocess.run(["mount", *source, str(root / "usr")], check=True)
            mounted.append(root / "usr")
        else:
            extract = f"--extract={root / 'usr'}"
            subprocess.run(
                ["fsck.erofs", extract, "--overwrite", str(built_image.path)], check=True
            )
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        mounted.append(root / "proc")
        subprocess.run(["mount", "--bind", "/dev", str(root / "dev")], check=True)
        mounted.append(root / "dev")
        yield root
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)


def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin",
        "PYTHONPATH": "/usr/lib/pyshim",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.run(
        ["chroot", str(root), *argv], capture_output=True, text=True, env=env, timeout=60
    )


def test_built_image_runs_the_agents_imports_runtimes_and_modprobe(
    built: tuple[GuestImage, Kernel], tmp_path: Path
) -> None:
    built_image, kernel = built
    agent = sorted(p.stem for p in (REPO / "shim" / "agent").glob("*.py") if p.stem != "__init__")
    modules = [f"shim.agent.{name}" for name in agent] + ["shim.runtimes.runc", "encodings.idna"]
    with guest_root(built_image, tmp_path) as root:
        usr = root / "usr"
        assert not (usr / "etc").exists() and (usr / image.STDLIB / "os.py").is_file()
        manifest = json.loads((usr / "share/pyshim/manifest.json").read_text())
        assert (manifest["key"], manifest["release"]) == (built_image.key, kernel.release)
        # No stdlib cruft, and an unchecked-hash pyc beside each module (flags word = 1).
        assert not (usr / image.STDLIB / "tkinter").exists()
        pyc = usr / f"lib/pyshim/shim/agent/__pycache__/service.{sys.implementation.cache_tag}.pyc"
        assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 1

        check = f"import sys; import {', '.join(modules)}; print(sys.prefix)"
        result = chroot(root, "/usr/bin/python3", "-S", "-c", check)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "/usr"  # the landmark found: no ld.so.cache needed

        assert built_image.runtimes == ("crun", "runc")
        for runtime in built_image.runtimes:  # each with its libraries
            result = chroot(root, runtime, "--version")
            assert result.returncode == 0 and f"{runtime} version" in result.stdout, result.stderr

        assert os.readlink(usr / "sbin/modprobe") == "../bin/busybox"
        assert (usr / "lib/modules" / kernel.release / "modules.dep").is_file()
        assert _modprobe_dependencies(root, kernel.release, "veth")[-1].endswith("/veth.ko")


def _modprobe_dependencies(root: Path, release: str, module: str) -> list[str]:
    """`busybox modprobe -D` (what it would insmod, from modules.dep), in a chroot where the
    image's tree is /lib/modules/<this host's release>: modprobe reads uname's."""
    modroot = root.parent / "modroot"
    here = os.uname().release
    for name in ("usr", f"lib/modules/{here}"):
        (modroot / name).mkdir(parents=True)
    binds = [(root / "usr", modroot / "usr")]
    binds.append((root / "usr/lib/modules" / release, modroot / "lib/modules" / here))
    mounted: list[Path] = []
    try:
        for source, target in binds:
            subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
            mounted.append(target)
        result = chroot(modroot, "/usr/bin/busybox", "modprobe", "-D", module)
        assert result.returncode == 0, result.stderr
        return [line.split()[-1] for line in result.stdout.splitlines() if line.strip()]
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)


def test_build_is_idempotent_and_recorded(built: tuple[GuestImage, Kernel]) -> None:
    built_image, kernel = built
    assert image.image_key(kernel, cache_dir=built_image.path.parent) == built_image.key
    before = built_image.path.stat().st_mtime_ns
    again = image.build_image(built_image.path.parent, kernel)
    assert again == built_image and built_image.path.stat().st_mtime_ns == before
    assert image.current_image(built_image.path.parent) == built_image
    assert not list(built_image.path.parent.glob(".staging-*"))
