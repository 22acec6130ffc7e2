"""Drop the debug sections (`.debug_*`) of the ELF shared objects under a folder, as `strip --strip-debug` does,
for image builds whose base has no binutils.

    python strip_debug.py SITE_PACKAGES        (prints what it saved)

Some wheels ship their extension modules with DWARF debug information that nothing reads at run time: uvloop's
loop module is 13.6 MB with it and 1.9 MB without, and aiohttp's and its helpers' carry a few MB more. Only
64-bit little-endian ELF files are changed, and only where the result keeps every loaded byte in place: the
sections the program loads, and the program headers, are copied as they are; the debug sections, which no
segment maps, are left out; the other unloaded sections (symbol and string tables) are packed after the loaded
part, and the section headers are written anew, their links to other sections renumbered. A file this cannot
handle (another layout, or a symbol that names a debug section) is left unchanged.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

SECTION = struct.Struct("<IIQQQQIIQQ")  # name, type, flags, addr, offset, size, link, info, addralign, entsize
SYMBOL = struct.Struct("<IBBHQQ")  # name, info, other, shndx, value, size
SHF_ALLOC, SHF_INFO_LINK = 0x2, 0x40
SHT_SYMTAB, SHT_RELA, SHT_NOBITS, SHT_REL, SHT_DYNSYM = 2, 4, 8, 9, 11
SHN_LORESERVE = 0xFF00  # section indices from here up are special (absolute, common, ...), not sections


def stripped(data: bytes) -> bytes | None:
    """`data` (an ELF file) without its debug sections; None when it has none or is not a file this handles."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None  # not ELF, or not 64-bit little-endian
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
    if shoff == 0 or shnum == 0 or shentsize != SECTION.size or shstrndx >= shnum:
        return None
    sections = [list(SECTION.unpack_from(data, shoff + index * SECTION.size)) for index in range(shnum)]
    names_at = sections[shstrndx][4]

    def name(section: list[int]) -> bytes:
        start = names_at + section[0]
        return data[start : data.index(b"\0", start)]

    debug = {i for i, s in enumerate(sections) if name(s).startswith(b".debug") and not s[2] & SHF_ALLOC}
    if not debug:
        return None
    # The loaded part of the file: the headers at its start, every segment (Elf64_Phdr: p_offset at 8, p_filesz
    # at 32), every loaded section.
    ends = [phoff + phnum * phentsize]
    for at in range(phoff, phoff + phnum * phentsize, phentsize):
        ends.append(struct.unpack_from("<Q", data, at + 8)[0] + struct.unpack_from("<Q", data, at + 32)[0])
    ends += [s[4] + s[5] for s in sections if s[2] & SHF_ALLOC and s[1] != SHT_NOBITS]
    loaded_end = max(ends)
    kept = [i for i in range(shnum) if i not in debug]
    renumbered = {old: new for new, old in enumerate(kept)}
    head = bytearray(data[:loaded_end])
    tail = bytearray()
    for index in sorted(kept, key=lambda i: sections[i][4]):
        section = sections[index]
        if section[1] == SHT_NOBITS or section[2] & SHF_ALLOC or index == 0:
            continue
        if section[4] < loaded_end:
            if section[4] + section[5] > loaded_end:
                return None  # straddles the loaded part: not a layout this handles
            continue
        alignment = max(section[8], 1)
        while (loaded_end + len(tail)) % alignment:
            tail.append(0)
        body = bytearray(data[section[4] : section[4] + section[5]])
        section[4] = loaded_end + len(tail)
        if section[1] == SHT_SYMTAB and not _renumber_symbols(body, renumbered, debug):
            return None
        tail += body
    for index in kept:  # a loaded symbol table is rewritten where it is
        section = sections[index]
        if section[1] == SHT_DYNSYM and section[2] & SHF_ALLOC:
            body = bytearray(head[section[4] : section[4] + section[5]])
            if not _renumber_symbols(body, renumbered, debug):
                return None
            head[section[4] : section[4] + section[5]] = body
    for index in kept:
        section = sections[index]
        if section[6] in debug:
            return None
        section[6] = renumbered.get(section[6], section[6]) if section[6] else 0
        if (section[1] in (SHT_REL, SHT_RELA) or section[2] & SHF_INFO_LINK) and section[7]:
            if section[7] in debug:
                return None
            section[7] = renumbered[section[7]]
    while (loaded_end + len(tail)) % 8:
        tail.append(0)
    new_shoff = loaded_end + len(tail)
    for index in kept:
        tail += SECTION.pack(*sections[index])
    struct.pack_into("<Q", head, 0x28, new_shoff)
    struct.pack_into("<HH", head, 0x3C, len(kept), renumbered[shstrndx])
    return bytes(head + tail)


def _renumber_symbols(table: bytearray, renumbered: dict[int, int], debug: set[int]) -> bool:
    """Renumber the section index of every symbol in `table`; False when one names a debug section."""
    for at in range(0, len(table) - SYMBOL.size + 1, SYMBOL.size):
        fields = list(SYMBOL.unpack_from(table, at))
        index = fields[3]
        if index == 0 or index >= SHN_LORESERVE:
            continue
        if index in debug or index not in renumbered:
            return False
        fields[3] = renumbered[index]
        SYMBOL.pack_into(table, at, *fields)
    return True


def strip_tree(root: Path) -> tuple[int, int]:
    """Strip every shared object under `root` in place: (files changed, bytes saved)."""
    changed = saved = 0
    for path in sorted(root.rglob("*.so*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        smaller = stripped(data)
        if smaller is None:
            continue
        path.write_bytes(smaller)
        changed, saved = changed + 1, saved + len(data) - len(smaller)
    return changed, saved


if __name__ == "__main__":
    files, saved_bytes = strip_tree(Path(sys.argv[1]))
    print(f"strip_debug.py: {files} shared objects without their debug sections, {saved_bytes / 1e6:.1f} MB saved")
