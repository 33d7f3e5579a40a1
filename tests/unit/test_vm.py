"""shim.vm's pure parts: the cpio bytes, the init script text, the QEMU command line, module
dependencies read from ELF .modinfo, and the accelerator choice's cache and setting."""

from __future__ import annotations

import dataclasses
import itertools
import json
import stat
import struct
from pathlib import Path

import pytest

from shim.vm import accel
from shim.vm.guest import GuestMount, GuestSetup, init_script
from shim.vm.initramfs import Entry, initramfs, newc_archive
from shim.vm.kernel import Kernel, find_kernel, has_module_index, modinfo, write_module_index
from shim.vm.qemu import Memory, SerialPort, Share, VmConfig, command_line


def parse_newc(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, data, rdev) of each member, checking the 4-byte alignment."""
    members, offset = [], 0
    while True:
        assert archive[offset : offset + 6] == b"070701" and offset % 4 == 0
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        name_size, size = fields[11], fields[6]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        data = archive[data_start : data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return members
        members.append((name, fields[1], data, (fields[9], fields[10])))


def test_newc_archive_round_trips_names_modes_data_and_devices() -> None:
    entries = [
        Entry("bin", stat.S_IFDIR | 0o755),
        Entry("bin/x", stat.S_IFREG | 0o755, b"12345"),
        Entry("bin/y", stat.S_IFLNK | 0o777, b"x"),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ]
    assert parse_newc(newc_archive(entries)) == [(e.path, e.mode, e.data, e.rdev) for e in entries]


def test_initramfs_holds_init_busybox_and_modules() -> None:
    archive = initramfs(b"BUSYBOX", [("9p.ko", b"MODULE")], "#!/bin/busybox sh\n")
    members = {name: (mode, data) for name, mode, data, _ in parse_newc(archive)}
    assert members["init"] == (stat.S_IFREG | 0o755, b"#!/bin/busybox sh\n")
    assert members["bin/busybox"] == (stat.S_IFREG | 0o755, b"BUSYBOX")
    assert members["lib/modules/9p.ko"][1] == b"MODULE"
    assert stat.S_ISCHR(members["dev/console"][0])
    assert stat.S_ISDIR(members["newroot"][0])


def test_init_script_mounts_shares_and_cgroup2_then_runs_the_command() -> None:
    setup = GuestSetup(
        modules=["virtio.ko", "9p.ko"],
        mounts=[GuestMount("host0", "/usr"), GuestMount("out", "/mnt/out", readonly=False)],
        command="pytest -m cgroup",
        symlinks=[("/bin", "usr/bin")],
        status_file="/mnt/out/status",
        environment=[("A", "b c")],
    )
    script = init_script(setup)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/busybox sh"
    assert lines.index("  insmod /lib/modules/virtio.ko") < lines.index(
        "  insmod /lib/modules/9p.ko"
    )
    assert (
        "-o trans=virtio,version=9p2000.L,msize=262144,ro,cache=loose host0 /newroot/usr" in script
    )
    assert "version=9p2000.L,msize=262144,rw out /newroot/mnt/out" in script
    assert "ln -s usr/bin /newroot/bin" in script
    # A share below a tmpfs (a host temp dir in /tmp) is mounted after it, not hidden by it.
    tmp = lines.index("  mkdir -p /newroot/tmp && mount -t tmpfs tmpfs /newroot/tmp")
    assert tmp < next(i for i, line in enumerate(lines) if "host0 /newroot/usr" in line)
    assert "exec switch_root /newroot /.vm/busybox sh /.vm/init stage2" in script
    assert "mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup" in script
    assert "echo +$c > /sys/fs/cgroup/cgroup.subtree_control" in script
    # As udev makes them: crun reads `update --resources -` from /dev/stdin.
    assert "  $bb ln -sf /proc/self/fd /dev/fd" in lines
    assert "  $bb ln -sf fd/0 /dev/stdin" in lines and "  $bb ln -sf fd/2 /dev/stderr" in lines
    assert "  export A='b c'" in lines
    command = lines.index("  ( cd / && pytest -m cgroup )")
    assert lines[command + 1 : command + 3] == ["  status=$?", "  echo $status > /mnt/out/status"]
    assert lines[-1] == 'if [ "$1" = stage2 ]; then stage2; else stage1; fi'


def test_command_line_for_tcg_with_shares_and_a_serial_port(tmp_path: Path) -> None:
    config = VmConfig(
        kernel=Path("/k/vmlinuz"),
        initrd=Path("/k/initrd"),
        append="console=ttyS0",
        console_log=Path("/out/console.log"),
        memory_mb=2048,
        vcpus=2,
        shares=[Share("usr", Path("/usr")), Share("out", Path("/out"), readonly=False)],
        serial_ports=[SerialPort("agent.0", Path("/run/agent.sock"))],
    )
    argv = command_line(config)
    pairs = dict(itertools.pairwise(argv))
    assert argv[0] == "qemu-system-x86_64"
    assert (pairs["-accel"], pairs["-cpu"], pairs["-smp"], pairs["-m"]) == (
        "tcg,thread=multi", "max", "2", "2048M"
    )  # fmt: skip
    assert (pairs["-kernel"], pairs["-initrd"], pairs["-append"]) == (
        "/k/vmlinuz", "/k/initrd", "console=ttyS0"
    )  # fmt: skip
    assert pairs["-serial"] == "file:/out/console.log"
    assert "-no-reboot" in argv and "-nodefaults" in argv
    fsdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-fsdev"]
    assert fsdevs == [
        "local,id=fsdev0,path=/usr,security_model=none,multidevs=remap,readonly=on",
        "local,id=fsdev1,path=/out,security_model=none,multidevs=remap",
    ]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-9p-pci,fsdev=fsdev1,mount_tag=out" in devices
    assert "virtserialport,chardev=agent.0,name=agent.0" in devices
    assert "socket,id=agent.0,path=/run/agent.sock,server=on,wait=off" in argv


def test_command_line_of_a_template_and_of_its_clone() -> None:
    """A template's RAM is a shared file (what the guest writes reaches it); a clone maps that
    file privately and waits for the state that QMP names."""
    template = VmConfig(
        Path("k"),
        Path("i"),
        "",
        Path("c"),
        memory_mb=256,
        disks=[Path("/assets/guest.erofs")],
        memory=Memory(Path("/t/memory"), shared=True),
        qmp_socket=Path("/run/qmp.sock"),
    )
    argv = command_line(template)
    pairs = dict(itertools.pairwise(argv))
    assert pairs["-object"] == ("memory-backend-file,id=ram0,size=256M,share=on,mem-path=/t/memory")
    assert pairs["-machine"] == "q35,memory-backend=ram0"
    assert pairs["-drive"] == "file=/assets/guest.erofs,if=none,id=disk0,format=raw,readonly=on"
    assert "virtio-blk-pci,drive=disk0" in argv
    assert pairs["-qmp"] == "unix:/run/qmp.sock,server=on,wait=off"
    assert "-incoming" not in argv
    clone = dataclasses.replace(
        template, memory=Memory(Path("/t/memory"), shared=False), incoming=True
    )
    argv = command_line(clone)
    assert "share=off" in dict(itertools.pairwise(argv))["-object"]
    assert argv[argv.index("-incoming") + 1] == "defer"


def test_command_line_caps_the_tcg_translation_cache_when_asked() -> None:
    config = VmConfig(Path("k"), Path("i"), "", Path("c"), tcg_cache_mb=32)
    argv = command_line(config)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi,tb-size=32"


def test_command_line_for_kvm_avoids_the_msr_this_host_rejects() -> None:
    config = VmConfig(Path("k"), Path("i"), "", Path("c"), accel="kvm")
    argv = command_line(config)
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host,-arch-capabilities"


def elf_with_modinfo(info: bytes) -> bytes:
    """A minimal ELF64 file: a null section, .modinfo and the section-name table."""
    names = b"\0.modinfo\0.shstrtab\0"
    header_size, section_size = 64, 64
    info_offset = header_size
    names_offset = info_offset + len(info)
    sections_offset = names_offset + len(names)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + b"\0" * 9, 1, 62, 1, 0, 0,
        sections_offset, 0, header_size, 0, 0, section_size, 3, 2,
    )  # fmt: skip
    section = struct.Struct("<IIQQQQIIQQ")
    sections = section.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    sections += section.pack(1, 1, 0, 0, info_offset, len(info), 0, 0, 1, 0)
    sections += section.pack(10, 3, 0, 0, names_offset, len(names), 0, 0, 1, 0)
    return header + info + names + sections


def test_modinfo_reads_depends_from_the_elf_section() -> None:
    elf = elf_with_modinfo(b"license=GPL\0depends=netfs,9pnet\0name=9p\0")
    assert modinfo(elf) == {"license": ["GPL"], "depends": ["netfs", "9pnet"], "name": ["9p"]}
    assert modinfo(elf_with_modinfo(b"depends=\0"))["depends"] == []


def fake_kernel(root: Path) -> Kernel:
    """vmlinuz and modules a -> b -> c, with c built in."""
    modules = root / "lib" / "modules" / "6.1.0-1-amd64"
    (modules / "kernel" / "fs").mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-6.1.0-1-amd64").write_bytes(b"")
    (modules / "modules.builtin").write_text("kernel/lib/c.ko\n")
    for name, depends in (("a", "b-x"), ("b-x", "c"), ("d", "")):
        info = f"depends={depends}\0".encode()
        (modules / "kernel" / "fs" / f"{name}.ko").write_bytes(elf_with_modinfo(info))
    return find_kernel(root)


def test_modules_come_in_load_order_without_builtins(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)
    assert [p.name for p in kernel.modules_in_load_order(["a", "d", "b_x"])] == [
        "b-x.ko", "a.ko", "d.ko"
    ]  # fmt: skip
    with pytest.raises(KeyError):
        kernel.modules_in_load_order(["missing"])


def test_find_kernel_names_the_setup_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run pyshim assets"):
        find_kernel(tmp_path)


def test_accel_setting_wins_and_the_probe_result_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = fake_kernel(tmp_path)
    cache = tmp_path / "accel.json"
    probes: list[Kernel] = []
    monkeypatch.setattr(accel, "kvm_usable", lambda: True)
    monkeypatch.setattr(accel, "boots_under_kvm", lambda k, _busybox: probes.append(k) or False)

    assert accel.choose_accel(kernel, cache, forced="kvm") == "kvm"
    assert probes == [] and not cache.exists()
    assert accel.choose_accel(kernel, cache) == "tcg"
    assert accel.choose_accel(kernel, cache) == "tcg"
    assert probes == [kernel]
    assert json.loads(cache.read_text())["accel"] == "tcg"
    with pytest.raises(ValueError, match="expected kvm or tcg"):
        accel.choose_accel(kernel, cache, forced="hvf")


def test_init_script_gives_the_kernel_a_modprobe_only_with_a_modules_tree() -> None:
    plain = init_script(GuestSetup(modules=(), mounts=(), command="true"))
    assert "modprobe" not in plain
    setup = GuestSetup(modules=(), mounts=(), command="true", modules_tree="/repo/lib/modules")
    stage1, stage2 = init_script(setup).split("stage2() {")
    assert "mount --bind /newroot/repo/lib/modules /newroot/.vm/modroot/lib/modules" in stage1
    assert "ln /newroot/.vm/busybox /newroot/.vm/modroot/modprobe" in stage1
    assert "chroot /.vm/modroot /modprobe" in stage1
    assert "echo /.vm/modprobe > /proc/sys/kernel/modprobe" in stage2
    assert "mount -t proc proc /.vm/modroot/proc" in stage2


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox")
def test_the_module_index_comes_from_busybox_depmod(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)
    (kernel.modules_dir / "kernel" / "fs" / "d.ko").write_bytes(
        elf_with_modinfo(b"alias=fs-dfs\0depends=\0")
    )
    assert not has_module_index(kernel)
    write_module_index(kernel, Path("/bin/busybox"))
    assert has_module_index(kernel)
    dep = (kernel.modules_dir / "modules.dep").read_text().splitlines()
    assert "kernel/fs/a.ko: kernel/fs/b-x.ko" in dep
    assert "alias fs-dfs d" in (kernel.modules_dir / "modules.alias").read_text()
    assert not [p for p in kernel.modules_dir.iterdir() if p.name.startswith(".")]
