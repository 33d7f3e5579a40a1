"""The compact uncompressed kernel QEMU boots by its PVH entry (shim.kata.pvh)."""

from __future__ import annotations

import lzma
import os
import struct
from pathlib import Path

import pytest

from shim.kata import pvh
from shim.vm.kernel import Kernel

HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM = struct.Struct("<IIQQQQQQ")


def elf(segments: list[bytes], note_in: int, note_at: int) -> bytes:
    """An ELF with one PT_LOAD per segment (2 MB aligned, as a kernel's) and a PT_NOTE at
    `note_at` bytes into segment `note_in`; section headers that the compact ELF drops."""
    offsets = [0x200000 * (i + 1) for i in range(len(segments))]
    count = len(segments) + 1
    out = bytearray(offsets[-1] + len(segments[-1]))
    HEADER.pack_into(
        out, 0, b"\x7fELF\x02\x01\x01", 2, 62, 1, 0x1000000, 64, 0x1234, 0, 64, 56, count, 64, 3, 2
    )
    for i, (offset, data) in enumerate(zip(offsets, segments, strict=True)):
        out[offset : offset + len(data)] = data
        address = 0x1000000 + offset
        PROGRAM.pack_into(
            out, 64 + i * 56, 1, 5, offset, address, address, len(data), len(data), 0x200000
        )
    note = offsets[note_in] + note_at
    PROGRAM.pack_into(out, 64 + len(segments) * 56, 4, 4, note, 0, 0, 8, 8, 4)
    return bytes(out)


def programs(image: bytes) -> list[tuple[int, ...]]:
    header = HEADER.unpack_from(image)
    return [PROGRAM.unpack_from(image, header[5] + i * header[9]) for i in range(header[10])]


def test_compact_elf_drops_trailing_zeros_and_moves_the_note_with_its_segment() -> None:
    text = b"text" * 1000 + b"NOTE1234" + b"more"
    data = b"data" + b"\0" * 100_000  # a .bss stored as zeros
    image = elf([text, data], note_in=0, note_at=4000)
    compact = pvh.compact_elf(image)
    header = HEADER.unpack_from(compact)
    assert (header[6], header[12]) == (0, 0)  # no section headers
    load_text, load_data, note = programs(compact)
    assert compact[load_text[2] : load_text[2] + load_text[5]] == text
    assert (load_data[5], load_data[6]) == (4, len(data))  # file size trimmed, memory size kept
    assert compact[load_data[2] : load_data[2] + 4] == b"data"
    assert all(p[2] % 4096 == p[3] % 4096 for p in (load_text, load_data))
    assert compact[note[2] : note[2] + 8] == b"NOTE1234"
    assert len(compact) < 3 * 4096


def test_written_after_write_until_the_vmlinuz_changes(tmp_path: Path) -> None:
    image = elf([b"kernel"], note_in=0, note_at=0)
    vmlinuz = tmp_path / "vmlinuz-6.1.0-1-amd64"
    vmlinuz.write_bytes(b"bzImage setup" + lzma.compress(image, lzma.FORMAT_XZ))
    kernel = Kernel(vmlinuz, tmp_path)
    assert pvh.written(kernel) is None
    assert pvh.write(kernel) == 0
    written = pvh.written(kernel)
    assert written == tmp_path / "vmlinux-6.1.0-1-amd64"
    assert written.read_bytes() == pvh.compact_elf(image)
    newer = written.stat().st_mtime_ns + 10**9
    os.utime(vmlinuz, ns=(newer, newer))
    assert pvh.written(kernel) is None


def test_a_kernel_without_an_xz_elf_is_refused() -> None:
    with pytest.raises(ValueError, match="no XZ"):
        pvh.uncompressed(b"gzip kernel")
    with pytest.raises(ValueError, match="not a 64-bit ELF"):
        pvh.uncompressed(lzma.compress(b"not an elf", lzma.FORMAT_XZ))
