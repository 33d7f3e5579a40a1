"""The Debian kernel unpacked by `pyshim assets` (shim.vm.assets), and its modules in load order.

The unpacked package has no modules.dep (depmod runs at install), so the initramfs's
dependencies come from each module's own .modinfo section ("depends=a,b"), as depmod reads
them; for the guest's modprobe, `write_module_index` writes modules.dep and the alias files
once with busybox's depmod (the host need not have kmod), into the kernel's directory or
(`write_module_index_to`) into another, such as the guest image's copy of the tree.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shim.sys.files import replace_file

_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_SECTION = struct.Struct("<IIQQQQIIQQ")


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    modules_dir: Path  # lib/modules/<release>

    def module_index(self) -> dict[str, Path]:
        """Module name (dashes as underscores, as the kernel names them) -> its .ko file."""
        return {
            module_name(path.name): path
            for path in sorted((self.modules_dir / "kernel").rglob("*.ko"))
        }

    @property
    def release(self) -> str:
        return self.modules_dir.name

    def builtin_modules(self) -> set[str]:
        builtin = self.modules_dir / "modules.builtin"
        return {module_name(Path(line).name) for line in builtin.read_text().split()}

    def modules_in_load_order(self, names: Iterable[str]) -> list[Path]:
        """The .ko files of `names` and of everything they depend on, dependencies first;
        built-in modules are left out. KeyError for a module this kernel does not have."""
        index, builtin = self.module_index(), self.builtin_modules()
        ordered: list[Path] = []

        def visit(name: str) -> None:
            name = module_name(name)
            if name in builtin or index.get(name) in ordered:
                return
            path = index[name]
            for dependency in modinfo(path.read_bytes()).get("depends", []):
                visit(dependency)
            ordered.append(path)

        for name in names:
            visit(name)
        return ordered


INDEX_FILES = ("modules.dep", "modules.alias", "modules.symbols")  # busybox modprobe's


def has_module_index(kernel: Kernel) -> bool:
    return all((kernel.modules_dir / name).exists() for name in INDEX_FILES)


def write_module_index(kernel: Kernel, busybox: Path) -> None:
    """modules.dep, modules.alias and modules.symbols in the kernel's own modules directory."""
    write_module_index_to(kernel.modules_dir, kernel, busybox)


def write_module_index_to(directory: Path, kernel: Kernel, busybox: Path) -> None:
    """The kernel's modules.dep, modules.alias and modules.symbols written into `directory`,
    from `busybox depmod -n` (its dry run prints the three in turn; ~4 s once per kernel), which
    only reads the kernel's tree: the guest image's copy gets them without the kernel's own
    directory being written. Each file is renamed into place, modules.dep last: boots at the
    same time never read half a file, and a missing modules.dep means "write again"."""
    root = kernel.modules_dir.parents[2]  # <root>/lib/modules/<release>
    out = subprocess.run(
        [str(busybox), "depmod", "-n", "-b", str(root), kernel.release],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    files: dict[str, list[str]] = {name: [] for name in INDEX_FILES}
    for line in out.splitlines(keepends=True):
        if line.startswith("alias symbol:"):
            files["modules.symbols"].append(line)
        elif line.startswith("alias "):
            files["modules.alias"].append(line)
        else:
            files["modules.dep"].append(line)
    for name in reversed(INDEX_FILES):
        replace_file(directory / name, "".join(files[name]).encode(), 0o644)


def find_kernel(root: Path) -> Kernel:
    """The newest kernel unpacked under `root`; FileNotFoundError if none."""
    for vmlinuz in sorted((root / "boot").glob("vmlinuz-*"), reverse=True):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        modules_dir = root / "lib" / "modules" / release
        if modules_dir.is_dir():
            return Kernel(vmlinuz, modules_dir)
    from shim.vm.assets import SETUP_COMMAND  # imports this module

    raise FileNotFoundError(f"no kernel unpacked under {root}; run {SETUP_COMMAND}")


def module_name(file_name: str) -> str:
    return file_name.removesuffix(".ko").replace("-", "_")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (keys may repeat)."""
    header = _ELF64_HEADER.unpack_from(elf)
    if header[0][:5] != b"\x7fELF\x02":
        raise ValueError("not a 64-bit ELF file")
    section_offset, section_size, section_count, names_index = (
        header[6], header[11], header[12], header[13]
    )  # fmt: skip
    sections = [
        _ELF64_SECTION.unpack_from(elf, section_offset + i * section_size)
        for i in range(section_count)
    ]
    names = sections[names_index]
    info: dict[str, list[str]] = {}
    for section in sections:
        name_start = names[4] + section[0]
        name = elf[name_start : elf.index(b"\0", name_start)]
        if name != b".modinfo":
            continue
        body = elf[section[4] : section[4] + section[5]]
        for entry in filter(None, body.split(b"\0")):
            key, _, value = entry.decode().partition("=")
            values = value.split(",") if key == "depends" else [value]
            info.setdefault(key, []).extend(filter(None, values))
    return info
