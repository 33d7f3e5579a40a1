"""The module information a Go program carries in its ``.go.buildinfo`` ELF section.

``start`` uses it to tell containerd 2.x (module ``github.com/containerd/containerd/v2``) from
1.7: both run the shim with the same flags, environment and stdin. Reads a few KiB of section
headers and the section itself, never the whole binary. Standard library only.
"""

from __future__ import annotations

import struct
from io import BufferedReader  # not typing.BinaryIO: importing typing costs start ~4 ms

SECTION = b".go.buildinfo"
MAGIC = b"\xff Go buildinf:"
HEADER_SIZE = 32  # magic, pointer size, flags, then padding
FLAG_INLINE_STRINGS = 0x2  # Go >= 1.18: the strings follow the header (older: pointers)
MAX_SECTION_SIZE = 1 << 20
SENTINEL_SIZE = 16  # random bytes the linker puts before and after the module text


def go_module_info(executable: str) -> str | None:
    """The ``go version -m`` text (``path``, ``mod``, ``dep``, ``build`` lines) of a Go
    executable, or None if it is not a readable ELF Go 1.18+ binary."""
    try:
        with open(executable, "rb") as f:
            section = _find_section(f, SECTION)
            if section is None:
                return None
            offset, size = section
            f.seek(offset)
            data = f.read(min(size, MAX_SECTION_SIZE))
    except (OSError, struct.error, ValueError):
        return None
    if len(data) < HEADER_SIZE or not data.startswith(MAGIC):
        return None
    if not data[len(MAGIC) + 1] & FLAG_INLINE_STRINGS:
        return None
    try:
        _go_version, position = _read_string(data, HEADER_SIZE)
        modinfo, _ = _read_string(data, position)
    except IndexError:
        return None
    if len(modinfo) > 2 * SENTINEL_SIZE:
        modinfo = modinfo[SENTINEL_SIZE:-SENTINEL_SIZE]
    return modinfo.decode(errors="replace")


def _find_section(f: BufferedReader, name: bytes) -> tuple[int, int] | None:
    """(file offset, size) of the named section of a 64-bit ELF file."""
    ident = f.read(16)
    if ident[:4] != b"\x7fELF" or ident[4] != 2:  # ELFCLASS64 only: where containerd runs
        return None
    order = "<" if ident[5] == 1 else ">"
    f.seek(0x28)
    (shoff,) = struct.unpack(order + "Q", f.read(8))
    f.seek(0x3A)
    entsize, count, names_index = struct.unpack(order + "HHH", f.read(6))
    if not shoff or entsize < 64 or names_index >= count:
        return None
    f.seek(shoff)
    table = f.read(entsize * count)

    def header(index: int) -> tuple[int, int, int]:
        """(name offset, file offset, size) of section ``index``."""
        start = index * entsize
        (name_offset,) = struct.unpack_from(order + "I", table, start)
        offset, size = struct.unpack_from(order + "QQ", table, start + 24)
        return name_offset, offset, size

    _, names_offset, names_size = header(names_index)
    f.seek(names_offset)
    names = f.read(min(names_size, MAX_SECTION_SIZE))
    for index in range(count):
        name_offset, offset, size = header(index)
        if names[name_offset : name_offset + len(name) + 1] == name + b"\0":
            return offset, size
    return None


def _read_string(data: bytes, position: int) -> tuple[bytes, int]:
    """A uvarint-length-prefixed string at ``position`` and the position after it."""
    length = shift = 0
    while True:
        byte = data[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if position + length > len(data):
        raise IndexError("string runs past the section")
    return data[position : position + length], position + length
