"""The kernel as QEMU boots it by its PVH entry: the ELF inside the vmlinuz, uncompressed once.

A bzImage decompresses itself in the guest: Debian's is XZ, 4-6 s of a TCG boot (~1 s on the
host, once). QEMU keeps every loaded segment for a reset, mapped from the file, so the ELF
written is compact: the program headers and each segment without its trailing zeros (the
.bss and .init.scratch; guest memory starts zeroed), 34 MB of Debian's 66 MB.
"""

from __future__ import annotations

import lzma
import os
import struct
from pathlib import Path

from shim.vm.kernel import Kernel

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz
_PT_LOAD, _PT_NOTE = 1, 4
_PAGE = 4096


def written(kernel: Kernel) -> Path | None:
    """The compact ELF of `kernel` if `write` made it from the current vmlinuz."""
    path = image_path(kernel)
    try:
        current = path.stat().st_mtime_ns >= kernel.vmlinuz.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    return path if current else None


def write(kernel: Kernel) -> int:
    """Write the compact ELF of `kernel` next to its vmlinuz; 0 (a child's exit code).

    ValueError if the vmlinuz holds no XZ-compressed ELF."""
    path = image_path(kernel)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(compact_elf(uncompressed(kernel.vmlinuz.read_bytes())))
    partial.replace(path)  # atomic: shims booting at once each write their own, one wins
    return 0


def image_path(kernel: Kernel) -> Path:
    """Where `write` puts the uncompressed kernel: beside the vmlinuz."""
    return kernel.vmlinuz.with_name(kernel.vmlinuz.name.replace("vmlinuz-", "vmlinux-", 1))


def uncompressed(vmlinuz: bytes) -> bytes:
    start = vmlinuz.find(_XZ_MAGIC)
    if start < 0:
        raise ValueError("the kernel image holds no XZ payload")
    try:
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(vmlinuz[start:])
    except lzma.LZMAError as exc:
        raise ValueError(f"the kernel's XZ payload: {exc}") from exc
    if elf[:5] != b"\x7fELF\x02":
        raise ValueError("the kernel's payload is not a 64-bit ELF")
    return elf


def compact_elf(elf: bytes) -> bytes:
    """`elf` with only its header, program headers and loadable data, each segment's trailing
    zeros left to its memory size; no section headers (QEMU reads none)."""
    header = list(_ELF_HEADER.unpack_from(elf))
    phoff, phentsize, phnum = header[5], header[9], header[10]
    programs = [list(_PROGRAM_HEADER.unpack_from(elf, phoff + i * phentsize)) for i in range(phnum)]
    loads = [p for p in programs if p[0] == _PT_LOAD]
    out = bytearray(_page_align(_ELF_HEADER.size + phnum * _PROGRAM_HEADER.size))
    moved: list[tuple[int, int, int]] = []  # (old offset, old end, new offset) of each segment
    for program in loads:
        offset, size = program[2], program[5]
        data = elf[offset : offset + size].rstrip(b"\0")
        out += b"\0" * (_page_align(len(out)) - len(out))
        moved.append((offset, offset + size, len(out)))
        program[2], program[5], program[7] = len(out), len(data), _PAGE
        out += data
    for program in programs:
        if program[0] == _PT_NOTE:  # the PVH entry note, inside a loaded segment
            old, _, new = next(m for m in moved if m[0] <= program[2] < m[1])
            program[2] += new - old
    header[5], header[6], header[9], header[11], header[12], header[13] = (
        _ELF_HEADER.size, 0, _PROGRAM_HEADER.size, 0, 0, 0
    )  # fmt: skip
    _ELF_HEADER.pack_into(out, 0, *header)
    for i, program in enumerate(programs):
        _PROGRAM_HEADER.pack_into(out, _ELF_HEADER.size + i * _PROGRAM_HEADER.size, *program)
    return bytes(out)


def _page_align(n: int) -> int:
    return -(-n // _PAGE) * _PAGE
